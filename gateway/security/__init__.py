"""Who may read what: subscriber tokens and topic permissions."""

from gateway.security.permissions import ReadRights, filter_covers
from gateway.security.tokens import Grant, TokenVerifier

__all__ = ["Grant", "ReadRights", "TokenVerifier", "filter_covers"]
