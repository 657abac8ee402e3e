-- The delete stage's checkpoint (STREAMREC_DELETE_FROM_TWILIO): when the
-- recording was deleted from Twilio (or found already gone). NULL on a completed
-- row means Twilio still holds it; a redelivery then deletes it.
ALTER TABLE recordings ADD COLUMN deleted_at timestamptz;
