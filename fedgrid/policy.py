"""Who may run which admin command: the authorization policy.

Provisioning writes `DEFAULT_POLICY` to the server kit's `local/authorization.json`; a project may
tighten it there. The server checks every admin command against the caller's role, which it reads
from the caller's verified certificate, never from the request.

Rights:
- `view`: check_status, list_jobs (everyone by default): the server, the sites, and every job's name and state;
- `submit`: submit_job, and clone_job of a job the caller may see;
- `manage`: a scope, "any" job, jobs submitted from the caller's "org", the caller's "own" jobs, or "none".
  It says which jobs the caller may see the content of (show_job, job_log, watch_job, download_job,
  clone_job: configuration, metrics, logs, models, code) and manage (abort_job, delete_job).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from fedgrid.errors import AuthorizationError, ConfigError
from fedgrid.validation import Schema, one_line

ROLES = ("project_admin", "org_admin", "lead", "member")
SCOPES = ("any", "org", "own", "none")
POLICY_FILE = "authorization.json"

DEFAULT_POLICY: dict[str, Any] = {
    "roles": {
        "project_admin": {"view": True, "submit": True, "manage": "any"},
        "org_admin": {"view": True, "submit": True, "manage": "org"},
        "lead": {"view": True, "submit": True, "manage": "own"},
        "member": {"view": True, "submit": False, "manage": "none"},
    }
}

COMMAND_RIGHTS: dict[str, str] = {
    "check_status": "view",
    "list_jobs": "view",
    "show_job": "view",
    "job_log": "view",
    "watch_job": "view",
    "submit_job": "submit",
    "clone_job": "submit",
    "abort_job": "manage",
    "delete_job": "manage",
    "download_job": "manage",
}

JOB_COMMANDS = frozenset({"show_job", "job_log", "watch_job", "download_job", "clone_job", "abort_job", "delete_job"})
"""Commands on one job: besides their right, the role's `manage` scope must cover that job (its owner)."""


class RoleRights(Schema):
    view: bool
    submit: bool
    manage: Literal[SCOPES]  # type: ignore[valid-type]


class PolicyFile(Schema):
    """authorization.json: {"roles": {<role>: {view, submit, manage}}}; a role left out may do nothing."""

    roles: dict[Literal[ROLES], RoleRights]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Caller:
    """An admin as the server knows it from the verified certificate."""

    name: str
    org: str
    role: str


@dataclass(frozen=True)
class JobOwner:
    submitter: str
    org: str


class Policy:
    """Answers "may this caller run this command (on this job)?"."""

    def __init__(self, roles: dict[str, RoleRights]) -> None:
        self._roles = roles

    @classmethod
    def from_dict(cls, data: Any, where: str = "policy") -> Policy:
        try:
            policy = PolicyFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {one_line(exc, PolicyFile)}") from None
        return cls(dict(policy.roles))

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read the policy file; a missing file means the default policy."""
        if not path.exists():
            return cls.from_dict(DEFAULT_POLICY)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
        try:
            policy = PolicyFile.model_validate_json(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {one_line(exc, PolicyFile)}") from None
        return cls(dict(policy.roles))

    def allows(self, caller: Caller, command: str, job: JobOwner | None = None) -> bool:
        """Whether `caller` may run `command`; for a command on one job, on the job owned by `job`
        (None: on some job of theirs, the question asked before the job is looked up)."""
        rights = self._roles.get(caller.role)
        if rights is None:
            return False
        kind = COMMAND_RIGHTS[command]
        granted = {"view": rights.view, "submit": rights.submit, "manage": True}[kind]
        if not granted or command not in JOB_COMMANDS:
            return granted
        if job is None:
            return rights.manage != "none"
        return {
            "any": True,
            "org": job.org == caller.org,
            "own": job.submitter == caller.name,
            "none": False,
        }[rights.manage]

    def check(self, caller: Caller, command: str, job: JobOwner | None = None) -> None:
        """Raise AuthorizationError naming the roles that would be allowed."""
        if self.allows(caller, command, job):
            return
        needed = []
        kind = COMMAND_RIGHTS[command]
        for role, rights in self._roles.items():
            if not {"view": rights.view, "submit": rights.submit, "manage": True}[kind]:
                continue
            if command not in JOB_COMMANDS:
                needed.append(role)
            elif rights.manage != "none":
                needed.append(
                    {"any": role, "org": f"{role} of the job's org", "own": f"{role} who submitted the job"}[
                        rights.manage
                    ]
                )
        what = f"{command} on job submitted by {job.submitter} ({job.org})" if job else command
        raise AuthorizationError(
            f"{what} needs role {' or '.join(needed) or 'none (disabled by policy)'}; "
            f"you are {caller.name} with role {caller.role} of org {caller.org}"
        )
