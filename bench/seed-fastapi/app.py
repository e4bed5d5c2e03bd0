"""The seed article's FastAPI dashboard service, as written there, for a side-by-side benchmark.

This is the Python stack the Rust service is measured against (`cargo xtask bench peer`): FastAPI,
asyncpg and httpx, with the article's `DatabasePool` (min 5, max 20 connections,
command_timeout=30), its `UserService.get_user_dashboard` (asyncio.TaskGroup, a per-request
Semaphore(10), errors caught per source) and its route. Only what the article leaves to the
reader is filled in: the database URL and the recommendation service's address come from the
environment, and the shared httpx.AsyncClient gets the same connection limits as the Rust client.
It is a benchmark peer, not part of the product.
"""

import asyncio
import os
from asyncio import TaskGroup
from contextlib import asynccontextmanager
from typing import Any, Dict, List, Optional

import asyncpg
import httpx
from fastapi import FastAPI, HTTPException

DATABASE_URL = os.environ["DATABASE_URL"]
RECOMMENDATIONS_URL = os.environ.get("RECOMMENDATIONS_URL", "http://127.0.0.1:9100")


class DatabasePool:
    """The article's connection pool manager (section 四)."""

    def __init__(self, dsn: str):
        self.dsn = dsn
        self.pool: Optional[asyncpg.Pool] = None

    async def connect(self):
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=5, max_size=20, command_timeout=30
        )

    async def close(self):
        if self.pool:
            await self.pool.close()

    async def get_user_orders(self, user_id: int) -> List[dict]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, product, amount, created_at FROM orders WHERE user_id = $1",
                user_id,
            )
            return [dict(row) for row in rows]

    async def get_user_profile(self, user_id: int) -> Optional[dict]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT id, username, email, avatar FROM users WHERE id = $1", user_id
            )
            return dict(row) if row else None

    async def get_user_reviews(self, user_id: int) -> List[dict]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, product_id, rating, content FROM reviews WHERE user_id = $1",
                user_id,
            )
            return [dict(row) for row in rows]


class UserService:
    """The article's service layer (section 五)."""

    def __init__(self, db: DatabasePool, http_client: httpx.AsyncClient):
        self.db = db
        self.http = http_client

    async def get_user_dashboard(self, user_id: int) -> Dict[str, Any]:
        result = {
            "profile": None,
            "orders": [],
            "reviews": [],
            "recommendations": [],
            "errors": [],
        }
        db_semaphore = asyncio.Semaphore(10)

        async with TaskGroup() as tg:

            async def safe_fetch(name, coro):
                try:
                    async with db_semaphore:
                        result[name] = await coro
                except asyncpg.PostgresError as e:
                    result["errors"].append({"source": name, "error": str(e)})
                except Exception as e:
                    result["errors"].append({"source": name, "error": str(e)})

            tg.create_task(safe_fetch("profile", self.db.get_user_profile(user_id)))
            tg.create_task(safe_fetch("orders", self.db.get_user_orders(user_id)))
            tg.create_task(safe_fetch("reviews", self.db.get_user_reviews(user_id)))
            tg.create_task(self._fetch_recommendations(user_id, result))
        return result

    async def _fetch_recommendations(self, user_id: int, result: dict):
        try:
            response = await self.http.get(
                f"{RECOMMENDATIONS_URL}/users/{user_id}/recommendations", timeout=5.0
            )
            if response.status_code == 200:
                result["recommendations"] = response.json()["items"]
        except Exception as e:
            result["errors"].append({"source": "recommendations", "error": str(e)})


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.db = DatabasePool(DATABASE_URL)
    await app.state.db.connect()
    app.state.http_client = httpx.AsyncClient(
        limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
    )
    yield
    await app.state.db.close()
    await app.state.http_client.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/api/users/{user_id}/dashboard")
async def user_dashboard(user_id: int):
    service = UserService(db=app.state.db, http_client=app.state.http_client)
    try:
        data = await service.get_user_dashboard(user_id)
        return {"status": "success", "data": data}
    except Exception as e:
        raise HTTPException(status_code=500, detail=str(e))
