-- Deterministic pseudo-random users, orders and reviews, generated inside PostgreSQL.
--
-- Run by `cargo xtask seed` as `psql -v users=N -f seed.sql`, on a migrated database whose tables
-- are empty. Every value is drawn from a hash of (user id, draw number), so the same N always
-- gives the same rows whatever the plan, and user k's rows do not depend on N.
--
-- The data is skewed like real data: about one user in ten has no orders, one in five hundred has
-- hundreds, and the rest have about ten (exponential, capped at 99); reviews follow the same shape
-- around three (a quarter have none). Ratings lean positive, as they do in real shops.

\set ON_ERROR_STOP on

-- A uniform draw in [0, 1) from (user id, draw number): 53 bits of PostgreSQL's 64-bit hash.
CREATE FUNCTION pg_temp.draw(id bigint, n bigint) RETURNS float8
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN ((hashint8extended(id, n) >> 11) & 9007199254740991)::float8 / 9007199254740992.0;

-- How many rows a user gets: none with probability `zero`, `heavy_lo..heavy_hi` with probability
-- `heavy`, otherwise ceil(exponential(mean)) within 1..cap.
CREATE FUNCTION pg_temp.skewed(id bigint, salt bigint, zero float8, heavy float8, heavy_lo int,
                               heavy_hi int, mean float8, cap int) RETURNS int
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE
        WHEN pg_temp.draw(id, salt) < zero THEN 0
        WHEN pg_temp.draw(id, salt) < zero + heavy
            THEN heavy_lo + floor(pg_temp.draw(id, salt + 1) * (heavy_hi - heavy_lo + 1))::int
        ELSE least(greatest(ceil(-ln(1 - pg_temp.draw(id, salt + 1)) * mean)::int, 1), cap)
    END;

-- The local cluster's role is a superuser: skip the per-row foreign-key triggers, which cost more
-- than the rest of the load together, and prove the references with one anti-join at the end.
SELECT rolsuper AS superuser FROM pg_roles WHERE rolname = current_user \gset
BEGIN;
\if :superuser
SET LOCAL session_replication_role = replica;
\endif

INSERT INTO users (id, username, email, avatar)
SELECT id, 'user' || id, 'user' || id || '@example.com',
       CASE WHEN pg_temp.draw(id, 1) < 0.7 THEN 'https://cdn.example.com/avatars/' || id || '.png' END
FROM generate_series(1, :users::bigint) AS id;

-- Orders: one of 24 products, mostly small amounts (0.99 to 999.99, cubed draw), placed in the
-- two years before 2026-01-01.
INSERT INTO orders (user_id, product, amount, created_at)
SELECT u.id,
       (ARRAY['Mechanical keyboard', 'Wireless mouse', 'USB-C hub', '27-inch monitor',
              'Laptop stand', 'Noise-cancelling headphones', 'Webcam', 'Desk lamp',
              'Ergonomic chair', 'Standing desk', 'Coffee grinder', 'Espresso machine',
              'Water bottle', 'Backpack', 'Notebook', 'Fountain pen', 'E-reader', 'Phone case',
              'Charging cable', 'Portable SSD', 'Smart speaker', 'Fitness tracker',
              'Running shoes', 'Rain jacket'])[1 + floor(pg_temp.draw(u.id, 1000 + 3 * k) * 24)::int],
       (99 + floor(power(pg_temp.draw(u.id, 1001 + 3 * k), 3) * 99900)) / 100,
       timestamptz '2026-01-01 00:00:00+00'
           - floor(pg_temp.draw(u.id, 1002 + 3 * k) * 63072000) * interval '1 second'
FROM generate_series(1, :users::bigint) AS u(id)
CROSS JOIN LATERAL generate_series(1, pg_temp.skewed(u.id, 10, 0.10, 0.002, 100, 400, 10.08, 99)) AS k
ORDER BY u.id, k;

INSERT INTO reviews (user_id, product_id, rating, content)
SELECT u.id,
       1 + floor(pg_temp.draw(u.id, 5000 + 3 * k) * 20000)::bigint,
       CASE
           WHEN r < 0.05 THEN 1 WHEN r < 0.12 THEN 2 WHEN r < 0.27 THEN 3 WHEN r < 0.60 THEN 4
           ELSE 5
       END,
       (ARRAY['Does what it says.', 'Great value for the price.', 'Arrived late but works fine.',
              'Would buy again.', 'Not what I expected.', 'Solid build quality.',
              'Stopped working after a month.', 'Exactly as described.',
              'Good, but the manual is confusing.', 'Five stars, no complaints.'])
           [1 + floor(pg_temp.draw(u.id, 5002 + 3 * k) * 10)::int]
FROM generate_series(1, :users::bigint) AS u(id)
CROSS JOIN LATERAL generate_series(1, pg_temp.skewed(u.id, 20, 0.25, 0.001, 50, 200, 3.34, 40)) AS k
CROSS JOIN LATERAL (SELECT pg_temp.draw(u.id, 5001 + 3 * k) AS r) AS rating
ORDER BY u.id, k;

\if :superuser
SELECT count(*) = 0 AS references_hold
FROM (SELECT user_id FROM orders UNION ALL SELECT user_id FROM reviews) AS rows
WHERE NOT EXISTS (SELECT 1 FROM users WHERE users.id = rows.user_id) \gset
\if :references_hold
\else
\echo 'seed.sql: some orders or reviews reference no user'
ROLLBACK;
\quit 3
\endif
\endif
COMMIT;
ANALYZE users, orders, reviews;
