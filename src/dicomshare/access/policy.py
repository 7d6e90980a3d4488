"""Who may do what: roles, token scopes and grant permissions as plain data, and one
``check()`` that every way in (DICOMweb, the JSON API, DIMSE, the CLI) asks.

A decision has two halves:

1. May this *kind of caller* do this *kind of thing*? ``allowed(principal, action)``:
   the role's actions, narrowed by the token's scopes; superusers may do everything.
2. May the caller touch *this data*? Data is owned by organisations (``instance_owner``);
   an organisation sees what it owns plus what live grants open to it or to the user.
   :class:`Visibility` carries that as data, and the index turns it into SQL, so a search
   only ever returns (and counts) visible instances, and a resource the caller may not see
   is answered exactly like one that does not exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from dicomshare.errors import Forbidden


class Action(StrEnum):
    SEARCH = "study.search"  # QIDO-RS, C-FIND
    VIEW = "study.view"  # metadata, frames, bulk data, rendered images, thumbnails
    DOWNLOAD = "study.download"  # whole instances: WADO-RS retrieve, C-GET, C-MOVE, send
    STORE = "study.store"  # STOW-RS, C-STORE, import, remote retrieve into the archive
    DELETE = "study.delete"
    SHARE = "study.share"  # create, list and revoke grants
    AUDIT_READ = "audit.read"
    MANAGE_ORGANISATION = "organisation.manage"  # users, tokens, AE titles of one's own org
    MANAGE_SITE = "site.manage"  # organisations; users and AE titles of any organisation
    REMOTE = "remote.use"  # C-FIND / retrieve against registered peers
    RESEARCH = "research.export"  # cohort counts and de-identified exports


ROLES = ("admin", "clinician", "uploader", "researcher", "auditor")
SCOPES = ("read", "write", "share", "admin")
GRANT_PERMISSIONS = ("view", "download", "add-series", "re-share", "research")

_DATA_READ = {Action.SEARCH, Action.VIEW, Action.DOWNLOAD}

ROLE_ACTIONS: dict[str, frozenset[Action]] = {
    "admin": frozenset(set(Action) - {Action.MANAGE_SITE}),
    "clinician": frozenset(_DATA_READ | {Action.STORE, Action.SHARE, Action.REMOTE}),
    "uploader": frozenset({Action.STORE}),
    # De-identified cohorts and exports are the researcher's only way to data.
    "researcher": frozenset({Action.RESEARCH}),
    "auditor": frozenset({Action.AUDIT_READ}),
}

SCOPE_ACTIONS: dict[str, frozenset[Action]] = {
    "read": frozenset(_DATA_READ | {Action.AUDIT_READ, Action.REMOTE, Action.RESEARCH}),
    "write": frozenset({Action.STORE}),
    "share": frozenset({Action.SHARE}),
    "admin": frozenset({Action.DELETE, Action.MANAGE_ORGANISATION, Action.MANAGE_SITE}),
}

# Which grant permission opens which action on the granted data. "download" implies "view".
GRANT_ACTIONS: dict[str, frozenset[Action]] = {
    "view": frozenset({Action.SEARCH, Action.VIEW}),
    "download": frozenset(_DATA_READ),
    "add-series": frozenset({Action.STORE}),
    "re-share": frozenset({Action.SHARE}),
    # The grantee's researchers may put the data in de-identified exports (and see nothing
    # identifiable).
    "research": frozenset({Action.RESEARCH}),
}


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip().lower() for s in items if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown:
        from dicomshare.errors import InvalidInput

        raise InvalidInput(f"unknown scope {sorted(unknown)[0]!r}; scopes are "
                           f"{', '.join(SCOPES)}")
    return scopes


def parse_permissions(text: str | Iterable[str]) -> frozenset[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    perms = frozenset(p.strip().lower() for p in items if p.strip())
    unknown = perms - set(GRANT_PERMISSIONS)
    if unknown or not perms:
        from dicomshare.errors import InvalidInput

        raise InvalidInput(f"grant permissions are {', '.join(GRANT_PERMISSIONS)}; "
                           f"got {','.join(sorted(perms)) or 'none'}")
    if "download" in perms:
        perms |= {"view"}
    return perms


@dataclass(frozen=True)
class Principal:
    """The caller of a request, whatever the way in (token, session, AE title, CLI)."""

    user: str
    organisation: str
    role: str
    token_id: int | None = None
    user_pk: int | None = None
    organisation_pk: int | None = None
    superuser: bool = False
    scopes: frozenset[str] = frozenset(SCOPES)
    kind: str = "token"  # token | session | ae | cli | link
    source: str | None = None  # client address or calling AE title
    # Live grants read when the credentials were checked (this request), or None: read them
    # when needed. Never kept beyond one request, so revocation stays immediate.
    grants: tuple[LiveGrant, ...] | None = None

    @property
    def is_admin(self) -> bool:
        return self.superuser or self.role == "admin"

    def with_source(self, source: str | None) -> Principal:
        from dataclasses import replace

        return replace(self, source=source)


def allowed(who: Principal, action: Action) -> bool:
    """The role/scope half of a decision (the data half is :class:`Visibility`)."""
    in_scope = any(action in SCOPE_ACTIONS[s] for s in who.scopes if s in SCOPE_ACTIONS)
    if not in_scope:
        return False
    return who.superuser or action in ROLE_ACTIONS.get(who.role, frozenset())


def check(who: Principal, action: Action) -> None:
    """Raise Forbidden unless the caller's role and scopes allow the action."""
    if not allowed(who, action):
        scope_ok = any(action in SCOPE_ACTIONS[s] for s in who.scopes if s in SCOPE_ACTIONS)
        why = (f"the {who.role} role may not {_VERBS[action]}" if scope_ok else
               f"this token's scopes ({','.join(sorted(who.scopes)) or 'none'}) do not "
               f"allow it to {_VERBS[action]}")
        raise Forbidden(why)


_VERBS = {
    Action.SEARCH: "search studies", Action.VIEW: "view studies",
    Action.DOWNLOAD: "download studies", Action.STORE: "store instances",
    Action.DELETE: "delete studies", Action.SHARE: "share studies",
    Action.AUDIT_READ: "read the audit trail",
    Action.MANAGE_ORGANISATION: "manage its organisation",
    Action.MANAGE_SITE: "manage organisations", Action.REMOTE: "use remote archives",
    Action.RESEARCH: "build research cohorts and exports",
}


@dataclass(frozen=True)
class Opening:
    """Part of another organisation's data a live grant opens: the instances owned by
    ``source`` in ``studies`` or in all studies of ``patients``."""

    source: int
    studies: frozenset[str] = frozenset()
    patients: frozenset[tuple[str, str]] = frozenset()  # (PatientID, Issuer or "")


@dataclass(frozen=True)
class Visibility:
    """What data one caller may touch for one action, as the index needs it.

    ``everything`` for superusers; otherwise instances owned by ``organisation`` plus
    the ``openings`` of live grants that allow the action. An empty Visibility (no
    organisation, no openings) sees nothing.
    """

    everything: bool = False
    organisation: int | None = None
    openings: tuple[Opening, ...] = field(default_factory=tuple)

    @property
    def nothing(self) -> bool:
        return not self.everything and self.organisation is None and not self.openings

    def owners_for(self, study_uid: str, patient: tuple[str, str]) -> frozenset[int]:
        """The owner organisations whose instances of this study the caller may see."""
        owners = {self.organisation} if self.organisation is not None else set()
        owners |= {o.source for o in self.openings
                   if study_uid in o.studies or patient in o.patients}
        return frozenset(owners)


EVERYTHING = Visibility(everything=True)


@dataclass(frozen=True)
class LiveGrant:
    """A grant as the policy needs it (see access/grants.py for the full record)."""

    pk: int
    source: int
    permissions: frozenset[str]
    study_uid: str | None
    patient: tuple[str, str] | None
    expires_at: datetime | None


def visibility(who: Principal, action: Action, grants: Iterable[LiveGrant]) -> Visibility:
    """The data the caller may touch for ``action``, given its live grants."""
    if who.superuser:
        return EVERYTHING
    studies: dict[int, set[str]] = {}
    patients: dict[int, set[tuple[str, str]]] = {}
    for g in grants:
        if not any(action in GRANT_ACTIONS[p] for p in g.permissions if p in GRANT_ACTIONS):
            continue
        if g.study_uid:
            studies.setdefault(g.source, set()).add(g.study_uid)
        elif g.patient:
            patients.setdefault(g.source, set()).add(g.patient)
    openings = tuple(Opening(src, frozenset(studies.get(src, ())),
                             frozenset(patients.get(src, ())))
                     for src in sorted(set(studies) | set(patients)))
    return Visibility(organisation=who.organisation_pk, openings=openings)
