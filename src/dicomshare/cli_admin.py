"""Administration commands: organisations, users, tokens, grants and AE titles.

Whoever can run these commands can read the data folder, so the CLI acts as a superuser
(of the organisation named with ``--org`` where one is needed); every change is still
written to the audit trail, with the operating-system user as the actor.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from dicomshare.access.policy import GRANT_PERMISSIONS, ROLES, SCOPES, Principal
from dicomshare.archive import Archive
from dicomshare.config import Settings
from dicomshare.errors import InvalidInput, NotFound


def add_parsers(sub: Any) -> None:
    orgs = sub.add_parser("orgs", help="manage organisations").add_subparsers(
        dest="action", required=True)
    orgs.add_parser("create", help="create an organisation").add_argument("name")
    orgs.add_parser("list", help="list organisations")

    users = sub.add_parser("users", help="manage users").add_subparsers(dest="action",
                                                                         required=True)
    create = users.add_parser("create", help="create a user")
    create.add_argument("name")
    create.add_argument("--org", required=True, help="organisation (created if new)")
    create.add_argument("--role", required=True, choices=list(ROLES))
    create.add_argument("--superuser", action="store_true",
                        help="site-wide: may create organisations and act in every one")
    create.add_argument("--password-stdin", action="store_true",
                        help="read the password from standard input")
    create.add_argument("--no-password", action="store_true",
                        help="no password: API tokens (or OpenID Connect) only")
    create.add_argument("--email", help="where notifications are e-mailed")
    ulist = users.add_parser("list", help="list users")
    ulist.add_argument("--org", help="only this organisation's")
    for verb in ("disable", "enable"):
        users.add_parser(verb, help=f"{verb} a user (tokens and sessions "
                         f"{'stop' if verb == 'disable' else 'work again'})"
                         ).add_argument("name")
    setrole = users.add_parser("set-role", help="change a user's role")
    setrole.add_argument("name")
    setrole.add_argument("role", choices=list(ROLES))
    setpw = users.add_parser("set-password", help="set a user's password (browser login)")
    setpw.add_argument("name")
    setpw.add_argument("--password-stdin", action="store_true",
                       help="read the password from standard input")
    setemail = users.add_parser("set-email", help="set (or with '' clear) a user's e-mail")
    setemail.add_argument("name")
    setemail.add_argument("email")

    tokens = sub.add_parser("tokens", help="manage API tokens").add_subparsers(
        dest="action", required=True)
    tcreate = tokens.add_parser("create", help="create a token; prints only the token")
    tcreate.add_argument("user")
    tcreate.add_argument("--name", help="a label for the token")
    tcreate.add_argument("--scope", default=",".join(SCOPES),
                         help=f"comma-separated scopes out of {','.join(SCOPES)} "
                         "(default: all; never more than the user's role allows)")
    tcreate.add_argument("--expires", metavar="WHEN",
                         help="expiry: a number of days (30d), hours (12h), or an ISO date")
    tcreate.add_argument("--expires-days", type=int, help=argparse.SUPPRESS)
    trevoke = tokens.add_parser("revoke", help="revoke a token by id")
    trevoke.add_argument("id", type=int)
    tlist = tokens.add_parser("list", help="list tokens (never their secrets)")
    tlist.add_argument("--user")

    grants = sub.add_parser("grants", help="open studies to another organisation or user"
                            ).add_subparsers(dest="action", required=True)
    gcreate = grants.add_parser("create", help="grant access to a study or a patient")
    what = gcreate.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", metavar="STUDY_UID")
    what.add_argument("--patient-id")
    gcreate.add_argument("--issuer", default="", help="IssuerOfPatientID of --patient-id")
    to = gcreate.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-org", metavar="ORG")
    to.add_argument("--to-user", metavar="USER")
    gcreate.add_argument("--from-org", required=True, metavar="ORG",
                         help="the organisation whose data is opened")
    gcreate.add_argument("--permissions", default="view",
                         help=f"comma-separated: {','.join(GRANT_PERMISSIONS)}")
    gcreate.add_argument("--expires", metavar="WHEN", help="30d, 12h or an ISO date")
    glist = grants.add_parser("list", help="list grants")
    glist.add_argument("--study", metavar="STUDY_UID")
    glist.add_argument("--active", action="store_true", help="only live grants")
    grants.add_parser("revoke", help="revoke a grant (and its re-shares)").add_argument(
        "id", type=int)

    ae = sub.add_parser("ae", help="registered DICOM peers (AE titles)").add_subparsers(
        dest="action", required=True)
    ae_add = ae.add_parser("add", help="register a peer: it may connect, and receive C-MOVEs")
    ae_add.add_argument("title")
    ae_add.add_argument("--host", required=True)
    ae_add.add_argument("--port", required=True, type=int)
    ae_add.add_argument("--description")
    ae_add.add_argument("--org", help="the organisation it acts for (default: the only one)")
    ae_add.add_argument("--scope", default="read,write",
                        help="what it may do when it calls: read (find, move, get), write "
                        "(store); default both")
    ae_add.add_argument("--tls", action="store_true", help="call it over DICOM TLS only "
                        "(--port is then its TLS port; see --dicom-tls-* of serve)")
    ae_add.add_argument("--replace", action="store_true", help="update an existing entry")
    ae_remove = ae.add_parser("remove", help="forget a peer")
    ae_remove.add_argument("title")
    ae.add_parser("list", help="list registered peers")


COMMANDS = ("orgs", "users", "tokens", "grants", "ae")


def run(settings: Settings, args: argparse.Namespace) -> int:
    archive = Archive.open(settings)
    try:
        handler = {"orgs": _orgs, "users": _users, "tokens": _tokens, "grants": _grants,
                   "ae": _ae}[args.command]
        return handler(archive, args)
    finally:
        archive.close()


def operator(archive: Archive, organisation: str | None = None) -> Principal:
    """The person at the terminal, as a superuser of ``organisation`` (default: the only
    one, ``local`` on a fresh archive; with several, it must be named)."""
    from dicomshare.access.identity import Identities

    identities = Identities(archive.index.engine)
    if organisation is None:
        orgs = identities.organisations()
        if not orgs:  # a fresh archive: the organisation `serve` would create on first start
            identities.ensure_organisation("local")
            orgs = identities.organisations()
        if len(orgs) != 1:
            raise InvalidInput("say which organisation this is for (--org NAME)")
        org = orgs[0]
    else:
        found = identities.organisation(organisation)
        assert found is not None
        org = found
    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = "unknown"
    return Principal(f"cli:{login}", org.name, "admin", organisation_pk=org.id,
                     superuser=True, kind="cli", source="localhost")


def _audit(archive: Archive, action: str, details: dict[str, Any]) -> None:
    """Record an administrative change; the trail is flushed before the command exits."""
    from dicomshare.access.audit import AuditEvent, AuditLog

    try:
        login = getpass.getuser()
    except (OSError, KeyError):
        login = "unknown"
    log = AuditLog.open(archive.settings, archive.index.engine)
    try:
        log.record(AuditEvent(action=action, user_name=f"cli:{login}", source="localhost",
                              details=details), wait=True)
    finally:
        log.close()


def when(text: str | None) -> datetime | None:
    """'30d', '12h', '90m' or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if text is None:
        return None
    text = text.strip()
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if text[:-1].isdigit() and text[-1:] in units:
        return datetime.now(UTC) + timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{text!r} is not 30d, 12h, 90m or an ISO date") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _orgs(archive: Archive, args: argparse.Namespace) -> int:
    from dicomshare.access.identity import Identities

    identities = Identities(archive.index.engine)
    if args.action == "create":
        org = identities.create_organisation(args.name)
        _audit(archive, "organisation.create", {"organisation": org.name})
        print(f"created organisation {org.name}", file=sys.stderr)
    else:
        for org in identities.organisations():
            print(f"{org.id}\t{org.name}\t{org.created_at:%Y-%m-%d %H:%M}")
    return 0


def _ask_password(from_stdin: bool) -> str | None:
    """The password from standard input, or asked twice at the terminal; None (with the
    reason printed) when it cannot be had."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        print("error: no terminal to ask for a password; use --password-stdin",
              file=sys.stderr)
        return None
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        print("error: passwords differ", file=sys.stderr)
        return None
    return password


def _users(archive: Archive, args: argparse.Namespace) -> int:
    from dicomshare.access.identity import Identities

    identities = Identities(archive.index.engine)
    if args.action == "list":
        org = identities.organisation(args.org) if args.org else None
        for u in identities.users(org.id if org else None):
            flags = ",".join(f for f, on in (("superuser", u.superuser),
                                             ("disabled", u.disabled)) if on)
            print(f"{u.name}\t{u.organisation}\t{u.role}\t{flags}")
        return 0
    if args.action == "set-email":
        from dicomshare.sharing.notify import set_email

        set_email(archive.index.engine, args.name, args.email)
        _audit(archive, "user.update", {"user": args.name, "email": args.email or None})
        print(f"set-email: {args.name}", file=sys.stderr)
        return 0
    if args.action == "set-password":
        new = _ask_password(args.password_stdin)
        if new is None:
            return 2 if not args.password_stdin and not sys.stdin.isatty() else 1
        identities.update_user(args.name, password=new)
        _audit(archive, "user.set-password", {"user": args.name})
        print(f"set-password: {args.name}", file=sys.stderr)
        return 0
    if args.action in ("disable", "enable", "set-role"):
        changed = identities.update_user(
            args.name, role=getattr(args, "role", None),
            disabled={"disable": True, "enable": False}.get(args.action))
        _audit(archive, f"user.{args.action}", {"user": changed.name, "role": changed.role})
        print(f"{args.action}: {changed.name} ({changed.role} of {changed.organisation})",
              file=sys.stderr)
        return 0
    password: str | None = None
    if not args.no_password:
        password = _ask_password(args.password_stdin)
        if password is None:
            return 2 if not args.password_stdin and not sys.stdin.isatty() else 1
    if args.email:
        from dicomshare.sharing.notify import clean_email

        clean_email(args.email)  # refused before the user exists
    user = identities.create_user(args.name, args.org, args.role, password,
                                  superuser=args.superuser)
    if args.email:
        from dicomshare.sharing.notify import set_email

        set_email(archive.index.engine, user.name, args.email)
    _audit(archive, "user.create", {"user": user.name, "organisation": user.organisation,
                                    "role": user.role, "superuser": user.superuser,
                                    "email": args.email or None})
    print(f"created user {args.name} ({args.role} of {args.org}"
          f"{', superuser' if args.superuser else ''})", file=sys.stderr)
    return 0


def _tokens(archive: Archive, args: argparse.Namespace) -> int:
    from dicomshare.access.identity import Identities
    from dicomshare.access.policy import parse_scopes

    identities = Identities(archive.index.engine)
    if args.action == "create":
        expires = when(args.expires)
        if args.expires_days is not None:
            expires = datetime.now(UTC) + timedelta(days=args.expires_days)
        scopes = parse_scopes(args.scope)
        token_id, secret = identities.create_token(args.user, args.name, expires, scopes)
        _audit(archive, "token.create", {"user": args.user, "token_id": token_id,
                                         "scopes": sorted(scopes)})
        print(secret)
        print(f"token id {token_id} for {args.user}", file=sys.stderr)
    elif args.action == "revoke":
        identities.revoke_token(args.id)
        _audit(archive, "token.revoke", {"token_id": args.id})
        print(f"revoked token {args.id}", file=sys.stderr)
    else:
        for t in identities.list_tokens(user=args.user):
            print(f"{t.id}\t{t.user}\t{t.name or ''}\t{t.prefix}...\t{t.state}\t"
                  f"{','.join(t.scopes)}\t{t.created_at:%Y-%m-%d %H:%M}"
                  + (f"\texpires {t.expires_at:%Y-%m-%d %H:%M}" if t.expires_at else ""))
    return 0


def _grants(archive: Archive, args: argparse.Namespace) -> int:
    from dicomshare.access.grants import Grants

    grants = Grants(archive.index.engine)
    if args.action == "create":
        who = operator(archive, args.from_org)
        grant = grants.create(
            who, study_uid=args.study,
            patient=(args.patient_id, args.issuer) if args.patient_id else None,
            organisation=args.to_org, user=args.to_user, permissions=args.permissions,
            expires_at=when(args.expires))
        _audit(archive, "grant.create", grant.as_json())
        print(f"grant {grant.id}: {','.join(grant.permissions)} on "
              f"{grant.study_uid or 'patient ' + str(grant.patient_id)} to "
              f"{grant.grantee_organisation or grant.grantee_user}", file=sys.stderr)
        print(grant.id)
    elif args.action == "revoke":
        who = operator(archive, _source_of(grants, args.id))
        grant = grants.revoke(who, args.id)
        _audit(archive, "grant.revoke", {"grant_id": grant.id})
        print(f"revoked grant {grant.id}", file=sys.stderr)
    else:
        who = Principal("cli", "", "admin", superuser=True, kind="cli")
        for gr in grants.list_grants(who, args.study, args.active):
            print(f"{gr.id}\t{gr.state}\t{gr.source_organisation}\t"
                  f"{gr.grantee_organisation or 'user ' + str(gr.grantee_user)}\t"
                  f"{gr.study_uid or 'patient ' + str(gr.patient_id)}\t"
                  f"{','.join(gr.permissions)}\t"
                  f"{gr.expires_at.isoformat() if gr.expires_at else 'no expiry'}")
    return 0


def _source_of(grants: Any, grant_id: int) -> str:
    try:
        return str(grants.get(grant_id).source_organisation)
    except NotFound:
        raise NotFound(f"no grant {grant_id}") from None


def _ae(archive: Archive, args: argparse.Namespace) -> int:
    from dicomshare.dimse.aes import AERegistry

    registry = AERegistry(archive.index.engine)
    if args.action == "add":
        ae = registry.add(args.title, args.host, args.port, args.description, args.replace,
                          args.org, args.scope, tls=args.tls)
        _audit(archive, "config.remote-ae", {"ae_title": ae.ae_title, "host": ae.host,
                                             "port": ae.port, "organisation": ae.organisation,
                                             "scopes": list(ae.scopes), "tls": ae.tls})
        print(f"registered {ae.ae_title} at {ae.host}:{ae.port}{' (TLS)' if ae.tls else ''} "
              f"for {ae.organisation}", file=sys.stderr)
    elif args.action == "remove":
        registry.remove(args.title)
        _audit(archive, "config.remote-ae", {"ae_title": args.title, "removed": True})
        print(f"removed {args.title}", file=sys.stderr)
    else:
        for ae in registry.all():
            print(f"{ae.ae_title}\t{ae.host}\t{ae.port}\t{'tls' if ae.tls else 'plain'}\t"
                  f"{ae.organisation or ''}\t{','.join(ae.scopes)}\t{ae.description or ''}")
    return 0
