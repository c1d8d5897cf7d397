"""Key listing for people: search by name, a sort column, pages (the console's key table)."""
from __future__ import annotations

from server.keys.lookup import KeyLookup
from server.keys.model import Key

SORTS = {"name": "name", "type": "key_type", "status": "status", "created": "created_at",
         "access": "last_access_at", "rotation": "next_rotation_at"}


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its own % _ \\ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def search_keys(lookup: KeyLookup, keystore_id: int, *, text: str = "", sort: str = "name",
                      desc: bool = False, page: int = 1, page_size: int = 50) -> tuple[list[Key], int]:
    """(one page of keys, how many match); `lookup` reads each row as the key service does (its seal checked)."""
    db = lookup.ctx.db
    col = SORTS.get(sort, "name")
    where, args = "keystore_id = ?", [keystore_id]
    if text:
        where += " AND LOWER(name) LIKE ? ESCAPE '\\'"
        args.append(like_pattern(text.lower()))
    total = await db.fetchval(f"SELECT COUNT(*) FROM keys WHERE {where}", *args)
    order = f"{col} {'DESC' if desc else 'ASC'}, id"
    rows = await db.fetchall(f"SELECT * FROM keys WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                             *args, page_size, (page - 1) * page_size)
    return [await lookup.from_row(r) for r in rows], int(total or 0)
