-- The reconciler (reconcile.py): which business a phone number belongs to, and
-- where each recording's stream entry came from.

-- A recording listed by Twilio's REST API carries no business_id; its call's
-- numbers do. `to` maps an inbound call, `from` an outbound one.
CREATE TABLE numbers (
    phone_number text PRIMARY KEY CHECK (phone_number ~ '^\+[1-9][0-9]{6,14}$'),
    business_id  text NOT NULL CHECK (business_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- 'webhook': its callback arrived; 'reconcile': the reconciler found it in
-- Twilio's Recordings list after the callback was lost. Rows written before
-- this migration all came by webhook.
ALTER TABLE recordings
    ADD COLUMN origin text NOT NULL DEFAULT 'webhook'
    CHECK (origin IN ('webhook', 'reconcile'));
