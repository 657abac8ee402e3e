-- What the dashboard looks up while a person watches: the recordings of the
-- last hour per business (updated_at), and a recording by its CallSid.
CREATE INDEX recordings_updated ON recordings (updated_at);
CREATE INDEX recordings_call ON recordings (call_sid);
