-- The SQLite buffer's tables (cloud/buffers/sqlite/). Run at every start: each statement is
-- idempotent; columns added since the first release are added by database.py.
CREATE TABLE IF NOT EXISTS channels (name TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY, channel TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, received_at REAL NOT NULL,
    only_group TEXT, meta BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_channel ON messages (channel, seq);
CREATE TABLE IF NOT EXISTS groups (
    channel TEXT NOT NULL, name TEXT NOT NULL, cursor INTEGER NOT NULL,
    seen_at REAL NOT NULL DEFAULT 0, PRIMARY KEY (channel, name));
CREATE TABLE IF NOT EXISTS pending (
    channel TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL, consumer TEXT NOT NULL,
    attempts INTEGER NOT NULL, due_at REAL NOT NULL, delivered_at REAL NOT NULL DEFAULT 0,
    log BLOB, PRIMARY KEY (channel, grp, seq));
CREATE INDEX IF NOT EXISTS pending_by_due ON pending (channel, grp, due_at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, grp TEXT NOT NULL,
    message_id TEXT NOT NULL, reason TEXT NOT NULL, attempts INTEGER NOT NULL,
    dead_at REAL NOT NULL, meta BLOB NOT NULL, body BLOB NOT NULL, log BLOB);
CREATE INDEX IF NOT EXISTS dead_letters_by_channel ON dead_letters (channel, id);
CREATE TABLE IF NOT EXISTS connections (
    channel TEXT NOT NULL, connection_id TEXT NOT NULL, record TEXT NOT NULL,
    seen_at REAL NOT NULL, PRIMARY KEY (channel, connection_id));
-- A connect drops the channel's stale records and counts the rest: with thousands of
-- connectors on one channel, a range of this index rather than every record.
CREATE INDEX IF NOT EXISTS connections_by_seen ON connections (channel, seen_at);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rates (
    key TEXT PRIMARY KEY, window_start REAL NOT NULL, hits INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, channel TEXT NOT NULL, time REAL NOT NULL,
    type TEXT NOT NULL, message_id TEXT NOT NULL, consumer TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, id);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY, channel TEXT NOT NULL, received_at REAL NOT NULL,
    meta BLOB NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_channel ON history (channel, received_at);
CREATE TABLE IF NOT EXISTS delivered_by (
    channel TEXT NOT NULL, connection_id TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (channel, connection_id));
CREATE TABLE IF NOT EXISTS counters (
    channel TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (channel, name));
