-- The dashboard's schema: users, their orders and their reviews.
-- Indexes serve the per-user reads: orders newest first, reviews by user.

CREATE TABLE users (
    id       bigint PRIMARY KEY,
    username text   NOT NULL UNIQUE,
    email    text   NOT NULL,
    avatar   text
);

CREATE TABLE orders (
    id         bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    bigint        NOT NULL REFERENCES users,
    product    text          NOT NULL,
    amount     numeric(12,2) NOT NULL CHECK (amount >= 0),
    created_at timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE reviews (
    id         bigint   GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id    bigint   NOT NULL REFERENCES users,
    product_id bigint   NOT NULL,
    rating     smallint NOT NULL CHECK (rating BETWEEN 1 AND 5),
    content    text     NOT NULL
);

CREATE INDEX orders_user_id_created_at_idx ON orders (user_id, created_at DESC);
CREATE INDEX reviews_user_id_idx ON reviews (user_id);
