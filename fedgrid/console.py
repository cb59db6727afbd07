"""The admin console (`<admin kit>/startup/fl_admin.sh`): the Session API as typed commands.

Interactive with line editing and history (readline), or one command at a time with `-c`, e.g.
`fl_admin.sh -c "list_jobs -a"`. Exit codes: 0 ok, 1 a command failed, 2 bad kit or usage,
3 server unreachable, 4 refused by the server.
"""

from __future__ import annotations

import argparse
import cmd
import datetime as dt
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from fedgrid.errors import AuthorizationError, FedgridError, IdentityError, KitError
from fedgrid.exit_codes import ExitCode, describe
from fedgrid.grpc_errors import UnreachableError
from fedgrid.serde import JobDetail, JobInfo, RoundInfo, ServerStatus, SiteStatus
from fedgrid.session import Session


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def ago(ts: float) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, dt.datetime.now().timestamp() - ts)
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=False))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
    return "\n".join(lines)


def format_server(status: ServerStatus) -> str:
    return (
        f"server {status.name} (project {status.project}, fedgrid {status.version})\n"
        f"  up since {when(status.started)} ({duration(status.uptime)})\n"
        f"  sites: {status.sites_alive} alive of {status.sites_known} in the project\n"
        f"  jobs: {status.jobs_running} running, {status.jobs_queued} queued"
    )


def format_sites(sites: list[SiteStatus]) -> str:
    if not sites:
        return "no sites"
    rows = [
        [
            s.name,
            s.org,
            s.state,
            ago(s.last_heartbeat),
            s.address or "-",
            ", ".join(j[:8] for j in s.running_jobs) or "-",
        ]
        for s in sites
    ]
    return table(rows, ["site", "org", "state", "last heartbeat", "address", "jobs"])


def format_jobs(jobs: list[JobInfo]) -> str:
    if not jobs:
        return "no jobs"
    rows = [[j.job_id, j.name, j.status, j.submitter, when(j.submit_time), duration(j.duration)] for j in jobs]
    return table(rows, ["job id", "name", "status", "submitter", "submitted", "duration"])


def format_round(r: RoundInfo, total: int = 0) -> str:
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in sorted(r.metrics.items()))
    of = f"/{total}" if total else ""
    return f"round {r.round}{of}  sites {r.sites_answered}/{r.sites_asked}  {metrics}  {r.seconds:.2f} s"


def format_detail(d: JobDetail) -> str:
    i = d.info
    lines = [
        f"job {i.job_id}  {i.name}",
        f"  status:     {i.status}{'  (encrypted)' if i.encrypted else ''}",
        f"  submitter:  {i.submitter} ({i.submitter_org}) at {when(i.submit_time)}",
        f"  started:    {when(i.start_time)}   ended: {when(i.end_time)}   duration: {duration(i.duration)}",
        f"  round:      {i.current_round}/{i.num_rounds}",
        f"  sites:      {', '.join(i.sites) or '-'}",
    ]
    if i.cloned_from:
        lines.append(f"  cloned from {i.cloned_from}")
    if i.error:
        lines.append(f"  error:      {i.error}")
    if d.result.get("waiting"):
        lines.append(f"  waiting:    {d.result['waiting']}")
    for site, state in sorted(d.site_states.items()):
        lines.append(f"  {site}: {state}")
    if d.rounds:
        lines.append("  rounds:")
        lines += [f"    {format_round(r)}" for r in d.rounds]
    if d.result.get("tracking"):
        lines.append(f"  tracking:   {d.result['tracking']}")
    return "\n".join(lines)


class Console(cmd.Cmd):
    """Admin commands; `help <command>` explains each."""

    intro = ""
    prompt = "> "

    def __init__(self, session: Session, out: Callable[[str], None] = print) -> None:
        super().__init__()
        self.session = session
        self.out = out
        self.failed = False

    def _run(self, fn: Callable[[], str | None]) -> None:
        try:
            text = fn()
        except (FedgridError, OSError) as exc:
            self.failed = True
            self.out(f"Error: {exc}")
            return
        if text:
            self.out(text)

    def _parse(self, parser: argparse.ArgumentParser, line: str) -> argparse.Namespace | None:
        try:
            return parser.parse_args(shlex.split(line))
        except SystemExit:
            self.failed = True
            return None
        except ValueError as exc:
            self.failed = True
            self.out(f"Error: {exc}")
            return None

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        self.failed = True
        self.out(f"Error: unknown command {line.split()[0]!r}; type help for the list")
        return False

    def do_check_status(self, line: str) -> None:
        """check_status server | check_status client [site ...]: the server's state, or each site's
        state, last heartbeat and address."""
        args = shlex.split(line)
        if not args or args[0] not in ("server", "client"):
            self.failed = True
            self.out("usage: check_status server | check_status client [site ...]")
            return
        if args[0] == "server":
            self._run(lambda: format_server(self.session.check_status("server")))  # type: ignore[arg-type]
        else:
            self._run(lambda: format_sites(self.session.check_status("client", args[1:])))  # type: ignore[arg-type]

    def do_submit_job(self, line: str) -> None:
        """submit_job <job folder>: validate, sign with this admin's key and submit; prints the job id."""
        args = shlex.split(line)
        if len(args) != 1:
            self.failed = True
            self.out("usage: submit_job <job folder>")
            return
        self._run(lambda: f"Submitted job: {self.session.submit_job(Path(args[0]).expanduser())}")

    def do_list_jobs(self, line: str) -> None:
        """list_jobs [-a] [-n name-prefix] [-m max]: submitted and running jobs (-a: all, finished too)."""
        parser = argparse.ArgumentParser(prog="list_jobs", add_help=False, exit_on_error=False)
        parser.add_argument("-a", "--all", action="store_true")
        parser.add_argument("-n", "--name", default="")
        parser.add_argument("-m", "--max", type=int, default=0)
        args = self._parse(parser, line)
        if args is not None:
            self._run(lambda: format_jobs(self.session.list_jobs(all=args.all, name_prefix=args.name, max=args.max)))

    def _job_command(self, line: str, usage: str, fn: Callable[[str], str | None]) -> None:
        args = shlex.split(line)
        if len(args) != 1:
            self.failed = True
            self.out(f"usage: {usage}")
            return
        self._run(lambda: fn(args[0]))

    def do_show_job(self, line: str) -> None:
        """show_job <job id>: meta, status, current round, per-round timings and metrics, each site's state."""
        self._job_command(line, "show_job <job id>", lambda j: format_detail(self.session.show_job(j)))

    def do_abort_job(self, line: str) -> None:
        """abort_job <job id>: stop the job on the server and on every site."""
        self._job_command(line, "abort_job <job id>", self.session.abort_job)

    def do_delete_job(self, line: str) -> None:
        """delete_job <job id>: remove a finished job and its files from the server."""
        self._job_command(line, "delete_job <job id>", self.session.delete_job)

    def do_clone_job(self, line: str) -> None:
        """clone_job <job id>: submit the same job again; prints the new job id."""
        self._job_command(line, "clone_job <job id>", lambda j: f"Cloned as job: {self.session.clone_job(j)}")

    def do_download_job(self, line: str) -> None:
        """download_job <job id> [folder]: fetch a finished job's result (models, metrics, plot, logs)."""
        args = shlex.split(line)
        if len(args) not in (1, 2):
            self.failed = True
            self.out("usage: download_job <job id> [folder]")
            return
        self._run(
            lambda: f"Result can be found in: {self.session.download_job(args[0], args[1] if len(args) == 2 else None)}"
        )

    def do_job_log(self, line: str) -> None:
        """job_log <job id> [server | <site>] [-n lines]: the end of a job's log (a site's once the job ended)."""
        parser = argparse.ArgumentParser(prog="job_log", add_help=False, exit_on_error=False)
        parser.add_argument("job_id")
        parser.add_argument("source", nargs="?", default="server")
        parser.add_argument("-n", "--lines", type=int, default=50)
        args = self._parse(parser, line)
        if args is not None:
            self._run(lambda: self.session.job_log(args.job_id, args.source, args.lines) or "(empty log)")

    def do_watch_job(self, line: str) -> None:
        """watch_job <job id>: print each round as it finishes, until the job ends (Ctrl-C stops watching)."""

        def watch(job_id: str) -> str:
            for event in self.session.watch_job(job_id):
                if isinstance(event, RoundInfo):
                    self.out(format_round(event))
                else:
                    return f"job {event.job_id} {event.status}{': ' + event.error if event.error else ''}"
            return ""

        self._job_command(line, "watch_job <job id>", watch)

    def do_bye(self, line: str) -> bool:
        """bye: leave the console."""
        return True

    do_exit = do_bye
    do_quit = do_bye

    def do_EOF(self, line: str) -> bool:  # noqa: N802 - cmd's name for Ctrl-D
        self.out("")
        return True


def _history(path: Path) -> None:
    try:
        import atexit
        import readline
    except ImportError:
        return
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline: object, path: Path) -> None:
    try:
        readline.write_history_file(path)  # type: ignore[attr-defined]
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl_admin.sh",
        description="fedgrid admin console: log in to the server with this admin kit's certificate and run "
        "commands (check_status, submit_job, list_jobs, show_job, abort_job, download_job, clone_job, "
        "delete_job, job_log, watch_job, help, bye).",
        epilog=describe(),
    )
    parser.add_argument("--kit", type=Path, required=True, help="the admin's kit folder")
    parser.add_argument(
        "-c", "--command", action="append", default=[], help="run this command and exit (may be given several times)"
    )
    args = parser.parse_args(argv)
    try:
        session = Session(args.kit)
    except KitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except UnreachableError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except (IdentityError, AuthorizationError) as exc:
        print(f"Error: the server refused this admin: {exc}", file=sys.stderr)
        return ExitCode.REFUSED
    with session:
        console = Console(session)
        if args.command:
            for command in args.command:
                console.onecmd(command)
            return ExitCode.FAILED if console.failed else ExitCode.OK
        _history(session.kit.local_dir / ".console_history")
        print(
            f"Logged in as {session.name} ({session.role}, {session.org}) to project {session.project} "
            f"on server {session.server_name}. Type help or ? for commands, bye to leave."
        )
        try:
            console.cmdloop()
        except KeyboardInterrupt:
            print()
            return ExitCode.INTERRUPTED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
