"""Makes every text value of an audit row storable, by rules read from the audit_record table itself."""

from __future__ import annotations

from app.audit.models import AuditRecord
from app.durable.storable import REPLACEMENT, Storable

storable = Storable(AuditRecord.__table__)  # type: ignore[attr-defined]
TEXT_LIMITS = storable.text_limits

__all__ = ["REPLACEMENT", "TEXT_LIMITS", "storable"]
