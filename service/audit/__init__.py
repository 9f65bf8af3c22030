"""The audit log: who did what to which tenant's data, when and from where."""

from service.audit.service import ACTIONS, record

__all__ = ["ACTIONS", "record"]
