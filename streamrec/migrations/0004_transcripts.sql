-- Transcripts people can use: what the audio file itself says, the conversation
-- as speaker-labelled segments, per-chunk checkpoints and per-business settings.

-- Read from the downloaded file (the callback's duration_s is Twilio's claim).
-- segments: [{"speaker": str|null, "start_s": float, "end_s": float, "text": str}],
-- time-ordered where the model gave timestamps, per-channel blocks where not.
ALTER TABLE recordings
    ADD COLUMN audio_duration_s    double precision,
    ADD COLUMN audio_channels      smallint,
    ADD COLUMN audio_sample_rate   integer,
    ADD COLUMN segments            jsonb,
    ADD COLUMN transcript_language text,
    ADD COLUMN transcript_mode     text CHECK (transcript_mode IN ('transcribe', 'download-only'));

-- One row per transcribed chunk of one track: the checkpoint that spares a
-- redelivery the chunks already paid for. track 0 is the mono (or mixed) audio,
-- track n the file's channel n. [start_ms, end_ms) is the span the chunk stands
-- for; its upload began overlap earlier (audio_start_ms) for context.
CREATE TABLE transcript_chunks (
    recording_sid  text NOT NULL REFERENCES recordings ON DELETE CASCADE,
    track          smallint NOT NULL CHECK (track >= 0),
    start_ms       integer NOT NULL CHECK (start_ms >= 0),
    end_ms         integer NOT NULL,
    audio_start_ms integer NOT NULL,
    text           text NOT NULL,
    segments       jsonb,
    model          text NOT NULL,
    language       text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (recording_sid, track, start_ms),
    CHECK (end_ms > start_ms AND audio_start_ms <= start_ms)
);

-- Per-business transcription settings; NULL: the process's default
-- (STREAMREC_TRANSCRIBE_*); language 'auto': detected, whatever the default.
-- Read for each recording, so a change reaches every replica with the next one.
CREATE TABLE business_settings (
    business_id text PRIMARY KEY CHECK (business_id ~ '^[A-Za-z0-9_.-]{1,64}$'),
    mode        text CHECK (mode IN ('transcribe', 'download-only')),
    language    text CHECK (language ~ '^([a-z]{2,3}|auto)$'),  -- auto: detected
    model       text CHECK (model ~ '^[A-Za-z0-9_.:-]{1,64}$'),
    channels    text CHECK (channels IN ('split', 'mixed')),
    speakers    text[] CHECK (cardinality(speakers) = 2),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
