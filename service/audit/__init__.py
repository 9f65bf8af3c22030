"""The audit log: who did what to which tenant's data, when and from where."""

from service.audit.service import ACTIONS, AuditFilter, AuditSlice, list_events, record

__all__ = ["ACTIONS", "AuditFilter", "AuditSlice", "list_events", "record"]
