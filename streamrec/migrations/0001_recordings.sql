-- One row per recording, keyed on RecordingSid. The stage columns (audio_path,
-- transcript) say how far a recording got, so a redelivery resumes there.
CREATE TABLE recordings (
    recording_sid    text PRIMARY KEY CHECK (recording_sid ~ '^RE[0-9a-fA-F]{32}$'),
    call_sid         text NOT NULL,
    account_sid      text NOT NULL,
    business_id      text NOT NULL,
    status           text NOT NULL
                     CHECK (status IN ('received', 'downloaded', 'completed', 'failed', 'absent')),
    audio_path       text,
    audio_bytes      bigint,
    duration_s       integer,
    transcript       text,
    transcript_model text,
    error            text,
    attempts         integer NOT NULL DEFAULT 0,
    entry_id         text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    downloaded_at    timestamptz,
    transcribed_at   timestamptz,
    completed_at     timestamptz
);

CREATE INDEX recordings_business_created ON recordings (business_id, created_at);
CREATE INDEX recordings_unfinished ON recordings (status) WHERE status <> 'completed';
