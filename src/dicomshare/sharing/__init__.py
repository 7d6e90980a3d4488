"""Sharing: share links (sharing/links.py), the inbox of studies sent between
organisations (inbox.py), second-opinion consults (consults.py), notifications in the API
and by e-mail (notify.py) and upload links (uploads.py). Each builds on the access layer:
what a link or an accepted send opens is a grant-like opening checked by the same policy.
"""
