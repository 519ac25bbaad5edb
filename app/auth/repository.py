"""SQL for API keys. Callers own the session and its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from app.auth.keys import generate_key, hash_key, shown_prefix
from app.auth.models import ApiKey
from app.auth.principal import KeyLimits


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(
        self,
        name: str,
        limits: KeyLimits | None = None,
        *,
        is_admin: bool = False,
        allowed_tools: list[str] | None = None,
        sandbox_limits: dict[str, float] | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; the plaintext is returned once and never stored."""
        plaintext = generate_key()
        row = ApiKey(
            name=name,
            prefix=shown_prefix(plaintext),
            key_hash=hash_key(plaintext),
            is_admin=is_admin,
            allowed_tools=allowed_tools,
            sandbox_limits=sandbox_limits,
            **asdict(limits or KeyLimits()),
        )
        self.session.add(row)
        await self.session.flush()
        return row, plaintext

    async def find_active_by_hash(self, key_hash: str) -> ApiKey | None:
        result = await self.session.exec(
            select(ApiKey).where(ApiKey.key_hash == key_hash, col(ApiKey.revoked_at).is_(None))
        )
        return result.first()

    async def make_admin(self, row: ApiKey) -> None:
        if not row.is_admin:
            row.is_admin = True
            self.session.add(row)
            await self.session.flush()

    async def list(self, include_revoked: bool = False) -> Sequence[ApiKey]:
        query = select(ApiKey).order_by(col(ApiKey.id))
        if not include_revoked:
            query = query.where(col(ApiKey.revoked_at).is_(None))
        return (await self.session.exec(query)).all()

    async def count_active(self) -> int:
        return len(await self.list())

    async def revoke(self, ident: str) -> ApiKey | None:
        """Revoke by numeric id or by shown prefix; None when nothing active matches."""
        query = select(ApiKey).where(col(ApiKey.revoked_at).is_(None))
        query = query.where(ApiKey.id == int(ident)) if ident.isdigit() else query.where(ApiKey.prefix == ident)
        row = (await self.session.exec(query)).first()
        if row is None:
            return None
        row.revoked_at = datetime.now(UTC)
        self.session.add(row)
        await self.session.flush()
        return row
