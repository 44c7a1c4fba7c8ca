-- Retention passes find old history by time.
CREATE INDEX heartbeats_received ON heartbeats (received_at);
CREATE INDEX events_received ON events (received_at);
