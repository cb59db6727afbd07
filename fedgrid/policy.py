"""Who may run which admin command: the authorization policy.

Provisioning writes `DEFAULT_POLICY` to the server kit's `local/authorization.json`; a project may
tighten it there. The server checks every admin command against the caller's role, which it reads
from the caller's verified certificate, never from the request.

Rights:
- `view`: check_status, list_jobs, show_job, job_log (everyone by default);
- `submit`: submit_job, clone_job;
- `manage`: abort_job, delete_job, download_job, with a scope: "any" job, jobs submitted from the
  caller's "org", the caller's "own" jobs, or "none".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgrid.errors import AuthorizationError, ConfigError

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


@dataclass(frozen=True)
class RoleRights:
    view: bool
    submit: bool
    manage: str


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
        if not isinstance(data, dict) or set(data) != {"roles"} or not isinstance(data["roles"], dict):
            raise ConfigError(f'{where}: expected {{"roles": {{<role>: {{view, submit, manage}}}}}}')
        roles: dict[str, RoleRights] = {}
        for role, rights in data["roles"].items():
            if role not in ROLES:
                raise ConfigError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if not isinstance(rights, dict) or set(rights) != {"view", "submit", "manage"}:
                raise ConfigError(f"{where}: role {role!r} needs exactly the keys view, submit, manage")
            if not isinstance(rights["view"], bool) or not isinstance(rights["submit"], bool):
                raise ConfigError(f"{where}: role {role!r}: view and submit must be true or false")
            if rights["manage"] not in SCOPES:
                raise ConfigError(f"{where}: role {role!r}: manage must be one of {', '.join(SCOPES)}")
            roles[role] = RoleRights(rights["view"], rights["submit"], rights["manage"])
        return cls(roles)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read the policy file; a missing file means the default policy."""
        if not path.exists():
            return cls.from_dict(DEFAULT_POLICY)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, str(path))

    def allows(self, caller: Caller, command: str, job: JobOwner | None = None) -> bool:
        rights = self._roles.get(caller.role)
        if rights is None:
            return False
        kind = COMMAND_RIGHTS[command]
        if kind == "view":
            return rights.view
        if kind == "submit":
            return rights.submit and (job is None or rights.view)
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
        for role, rights in self._roles.items():
            kind = COMMAND_RIGHTS[command]
            if kind == "view" and rights.view or kind == "submit" and rights.submit:
                needed.append(role)
            elif kind == "manage" and rights.manage != "none":
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
