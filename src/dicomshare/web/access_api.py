"""JSON API for identities, grants and the audit trail (under ``/api``).

Who may do what, in one place:

- organisations: superusers create them; everybody sees their own;
- users: an organisation's admins list, create and change its users (never superusers,
  never in another organisation); superusers do so everywhere;
- tokens: everybody creates, lists and revokes their own; admins also their users';
- grants: sharers (clinicians, admins) open their organisation's studies and revoke
  what they opened; everybody lists the grants that concern them;
- audit: auditors and admins read their organisation's trail (its users' actions and
  actions on its data); superusers read everything.

Every change is written to the audit trail; refusals too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from dicomshare.access.grants import Grants
from dicomshare.access.identity import Identities, TokenInfo, UserInfo
from dicomshare.access.policy import (
    GRANT_PERMISSIONS,
    ROLES,
    SCOPES,
    Action,
    Principal,
    parse_scopes,
)
from dicomshare.access.service import Access
from dicomshare.errors import Forbidden, InvalidInput, NotFound
from dicomshare.web.app import principal, requires

router = APIRouter(tags=["access"])
Caller = Annotated[Principal, Depends(principal)]






Sharer = Annotated[Principal, Depends(requires(Action.SHARE))]
Manager = Annotated[Principal, Depends(requires(Action.MANAGE_ORGANISATION))]
SiteManager = Annotated[Principal, Depends(requires(Action.MANAGE_SITE))]
Auditor = Annotated[Principal, Depends(requires(Action.AUDIT_READ))]


def _identities(request: Request) -> Identities:
    return request.app.state.identities


def _grants(request: Request) -> Grants:
    return request.app.state.grants


def _access(request: Request) -> Access:
    return request.app.state.access


async def _audit(request: Request, action: str, who: Principal, details: dict[str, Any],
           outcome: str = "success") -> None:
    await run_in_threadpool(lambda: _access(request).record(
        action, who, outcome, wait=True, details=details))


# -- organisations ---------------------------------------------------------------------------
class OrganisationModel(BaseModel):
    id: int
    name: str
    created_at: datetime


class OrganisationCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)


@router.get("/organisations", response_model=list[OrganisationModel])
async def list_organisations(request: Request, who: Caller) -> list[OrganisationModel]:
    orgs = await run_in_threadpool(_identities(request).organisations)
    return [OrganisationModel(id=o.id, name=o.name, created_at=o.created_at) for o in orgs
            if who.superuser or o.id == who.organisation_pk]


@router.post("/organisations", response_model=OrganisationModel, status_code=201)
async def create_organisation(request: Request, body: OrganisationCreate,
                              who: SiteManager) -> OrganisationModel:
    org = await run_in_threadpool(_identities(request).create_organisation, body.name)
    await _audit(request, "organisation.create", who, {"organisation": org.name})
    return OrganisationModel(id=org.id, name=org.name, created_at=org.created_at)


# -- users -----------------------------------------------------------------------------------
class UserModel(BaseModel):
    name: str
    organisation: str
    role: str
    superuser: bool
    disabled: bool
    created_at: datetime
    email: str | None = None


class UserCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    organisation: str | None = Field(None, max_length=200,
                                     description="default: the caller's; others: superusers")
    role: Literal[ROLES]  # type: ignore[valid-type]
    password: str | None = Field(None, min_length=8, max_length=1000)
    superuser: bool = False
    email: str | None = Field(None, max_length=320, description="where notifications go")


class UserUpdate(BaseModel):
    role: Literal[ROLES] | None = None  # type: ignore[valid-type]
    disabled: bool | None = None
    password: str | None = Field(None, min_length=8, max_length=1000)
    email: str | None = Field(None, max_length=320, description='"" clears it')


def _user_model(u: UserInfo, email: str | None = None) -> UserModel:
    return UserModel(name=u.name, organisation=u.organisation, role=u.role,
                     superuser=u.superuser, disabled=u.disabled, created_at=u.created_at,
                     email=email)


def _emails(request: Request, org: int | None = None) -> dict[str, str | None]:
    from dicomshare.sharing.notify import emails

    return emails(request.app.state.archive.index.engine, org)


def _managed_user(identities: Identities, who: Principal, name: str) -> UserInfo:
    """A user the caller manages; others answer 404 like unknown ones."""
    try:
        user = identities.user(name)
    except NotFound:
        raise NotFound(f"no user {name!r}") from None
    if not who.superuser and (user.organisation != who.organisation or user.superuser):
        raise NotFound(f"no user {name!r}")
    return user


@router.get("/users", response_model=list[UserModel])
async def list_users(request: Request, who: Manager) -> list[UserModel]:
    users = await run_in_threadpool(_identities(request).users,
                                    None if who.superuser else who.organisation_pk)
    addresses = await run_in_threadpool(_emails, request,
                                        None if who.superuser else who.organisation_pk)
    return [_user_model(u, addresses.get(u.name)) for u in users]


@router.post("/users", response_model=UserModel, status_code=201)
async def create_user(request: Request, body: UserCreate, who: Manager) -> UserModel:
    organisation = body.organisation or who.organisation
    if not who.superuser and (organisation != who.organisation or body.superuser):
        raise Forbidden("organisation admins create users of their own organisation only")
    from dicomshare.sharing.notify import clean_email, set_email

    email = clean_email(body.email)
    user = await run_in_threadpool(
        lambda: _identities(request).create_user(body.name, organisation, body.role,
                                                 body.password, superuser=body.superuser,
                                                 create_organisation=False))
    if email:
        await run_in_threadpool(set_email, request.app.state.archive.index.engine, user.name,
                                email)
    await _audit(request, "user.create", who, {"user": user.name, "organisation": user.organisation,
                                        "role": user.role, "superuser": user.superuser})
    return _user_model(user, email)


@router.patch("/users/{name}", response_model=UserModel)
async def update_user(request: Request, name: str, body: UserUpdate,
                      who: Manager) -> UserModel:
    identities = _identities(request)
    await run_in_threadpool(_managed_user, identities, who, name)
    if name == who.user and (body.disabled or (body.role and body.role != who.role)):
        raise InvalidInput("you cannot disable yourself or change your own role")
    if body.email is not None:
        from dicomshare.sharing.notify import set_email

        await run_in_threadpool(set_email, request.app.state.archive.index.engine, name,
                                body.email)
    user = await run_in_threadpool(lambda: identities.update_user(
        name, role=body.role, disabled=body.disabled, password=body.password))
    if body.disabled or body.password is not None:  # open browser sessions end too
        from dicomshare.web.auth import sessions_of

        await run_in_threadpool(sessions_of(request.app).revoke_all, user.id)
    changes = body.model_dump(exclude_none=True)
    if "password" in changes:
        changes["password"] = "changed"
    await _audit(request, "user.update", who, {"user": name, **changes})
    addresses = await run_in_threadpool(_emails, request, None)
    return _user_model(user, addresses.get(name))


# -- tokens ----------------------------------------------------------------------------------
class TokenModel(BaseModel):
    id: int
    user: str
    name: str | None
    prefix: str
    scopes: list[str]
    state: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreate(BaseModel):
    user: str | None = Field(None, description="default: the caller; others: admins")
    name: str | None = Field(None, max_length=200)
    scopes: list[Literal[SCOPES]] = list(SCOPES)  # type: ignore[valid-type]
    expires_at: datetime | None = None


class TokenCreated(TokenModel):
    token: str = Field(description="the secret: shown once, never stored")


def _token_model(t: TokenInfo) -> dict[str, Any]:
    return dict(id=t.id, user=t.user, name=t.name, prefix=t.prefix, scopes=list(t.scopes),
                state=t.state, created_at=t.created_at, expires_at=t.expires_at,
                revoked_at=t.revoked_at)


@router.get("/tokens", response_model=list[TokenModel])
async def list_tokens(request: Request, who: Caller) -> list[TokenModel]:
    """The caller's tokens; an admin's list also has its organisation's users' tokens."""
    identities = _identities(request)
    if who.superuser:
        found = await run_in_threadpool(identities.list_tokens)
    elif who.is_admin and "admin" in who.scopes:
        found = await run_in_threadpool(identities.list_tokens, who.organisation_pk)
    else:
        found = await run_in_threadpool(lambda: identities.list_tokens(user=who.user))
    return [TokenModel(**_token_model(t)) for t in found]


@router.post("/tokens", response_model=TokenCreated, status_code=201)
async def create_token(request: Request, body: TokenCreate, who: Caller) -> TokenCreated:
    identities = _identities(request)
    owner = body.user or who.user
    if owner != who.user:
        if not (who.is_admin and "admin" in who.scopes):
            raise Forbidden("only admins create tokens for other users")
        await run_in_threadpool(_managed_user, identities, who, owner)
    elif who.kind == "token" and not set(body.scopes) <= who.scopes:
        raise Forbidden("a token cannot create a token with more scopes than its own")
    token_id, secret = await run_in_threadpool(
        identities.create_token, owner, body.name, body.expires_at, parse_scopes(body.scopes))
    info = await run_in_threadpool(identities.token, token_id)
    await _audit(request, "token.create", who, {"user": owner, "token_id": token_id,
                                         "scopes": list(info.scopes)})
    return TokenCreated(token=secret, **_token_model(info))


@router.delete("/tokens/{token_id}", status_code=204)
async def revoke_token(request: Request, token_id: int, who: Caller) -> Response:
    identities = _identities(request)
    try:
        info = await run_in_threadpool(identities.token, token_id)
        if info.user != who.user and not who.superuser:
            if not (who.is_admin and "admin" in who.scopes):
                raise NotFound(f"no token with id {token_id}")
            await run_in_threadpool(_managed_user, identities, who, info.user)
    except NotFound:
        raise NotFound(f"no token with id {token_id}") from None
    await run_in_threadpool(identities.revoke_token, token_id)
    await _audit(request, "token.revoke", who, {"user": info.user, "token_id": token_id})
    return Response(status_code=204)


# -- grants ----------------------------------------------------------------------------------
class GrantCreate(BaseModel):
    study_uid: str | None = Field(None, min_length=1, max_length=64)
    patient_id: str | None = Field(None, min_length=1, max_length=64)
    issuer_of_patient_id: str = Field("", max_length=64)
    organisation: str | None = Field(None, max_length=200, description="grantee organisation")
    user: str | None = Field(None, max_length=200, description="grantee user")
    permissions: list[Literal[GRANT_PERMISSIONS]] = ["view"]  # type: ignore[valid-type]
    expires_at: datetime | None = None


@router.get("/grants")
async def list_grants(request: Request, who: Caller,
                      study: Annotated[str | None, Query(max_length=64)] = None,
                      active: bool = False) -> list[dict[str, Any]]:
    found = await run_in_threadpool(_grants(request).list_grants, who, study, active)
    return [g.as_json() for g in found]


@router.post("/grants", status_code=201)
async def create_grant(request: Request, body: GrantCreate, who: Sharer) -> dict[str, Any]:
    grants = _grants(request)
    try:
        grant = await run_in_threadpool(lambda: grants.create(
            who, study_uid=body.study_uid,
            patient=(body.patient_id, body.issuer_of_patient_id) if body.patient_id else None,
            organisation=body.organisation, user=body.user, permissions=body.permissions,
            expires_at=body.expires_at))
    except (NotFound, Forbidden) as exc:
        await _audit(request, "grant.create", who, {"reason": exc.reason, "study": body.study_uid,
                                             "patient_id": body.patient_id}, "denied")
        raise
    await run_in_threadpool(lambda: _access(request).record(
        "grant.create", who, wait=True,
        patient_ids=[grant.patient_id] if grant.patient_id else (),
        study_uids=[grant.study_uid] if grant.study_uid else (), details=grant.as_json()))
    return grant.as_json()


@router.delete("/grants/{grant_id}")
async def revoke_grant(request: Request, grant_id: int, who: Sharer) -> dict[str, Any]:
    grant = await run_in_threadpool(_grants(request).revoke, who, grant_id)
    await run_in_threadpool(lambda: _access(request).record(
        "grant.revoke", who, wait=True,
        patient_ids=[grant.patient_id] if grant.patient_id else (),
        study_uids=[grant.study_uid] if grant.study_uid else (), details=grant.as_json()))
    return grant.as_json()


# -- audit -----------------------------------------------------------------------------------
@router.get("/audit")
async def read_audit(
        request: Request, who: Auditor,
        patient_id: Annotated[str | None, Query(max_length=64)] = None,
        user: Annotated[str | None, Query(max_length=200)] = None,
        study: Annotated[str | None, Query(max_length=64)] = None,
        action: Annotated[str | None, Query(max_length=64)] = None,
        since: datetime | None = None, until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> list[dict[str, Any]]:
    """Audit records, newest first: an organisation's (its users' actions and actions on
    its data) for its auditors and admins, all of them for superusers."""
    log = _access(request).audit_log
    if log is None:
        return []
    records = await run_in_threadpool(lambda: log.query(
        organisation=None if who.superuser else who.organisation_pk, user=user,
        patient_id=patient_id, study_uid=study, action=action, since=since, until=until,
        limit=limit, offset=offset))
    _access(request).record("audit.read", who, details={
        k: v for k, v in (("patient_id", patient_id), ("user", user), ("study", study),
                          ("action", action)) if v} | {"records": len(records)})
    return [r.as_dict() for r in records]
