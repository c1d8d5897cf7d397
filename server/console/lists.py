"""Search, sort and paging parameters of the console's tables (read from the query string, bounded)."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlencode

PAGE_SIZE = 25


@dataclass
class Listing:
    q: str
    sort: str
    desc: bool
    page: int
    total: int = 0
    size: int = PAGE_SIZE
    extra: dict = field(default_factory=dict)    # other filters the links keep (e.g. the key stores' project)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    def url(self, base: str, **change) -> str:
        p = {**self.extra, "q": self.q, "sort": self.sort, "desc": "1" if self.desc else "", "page": self.page,
             **change}
        return base + "?" + urlencode({k: v for k, v in p.items() if v and not (k == "page" and v == 1)})

    def sort_url(self, base: str, col: str) -> str:
        return self.url(base, sort=col, desc="1" if col == self.sort and not self.desc else "", page=1)


def listing(query, sorts, default: str = "name") -> Listing:
    q = (query.get("q") or "").strip()[:100]
    sort = query.get("sort") or default
    page = query.get("page") or "1"
    return Listing(q=q, sort=sort if sort in sorts else default, desc=query.get("desc") == "1",
                   page=int(page) if (page.isascii() and page.isdigit()) and 0 < int(page) < 100_000 else 1)
