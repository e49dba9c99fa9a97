-- stead schema, version 14: what each instance's steps store.
--
-- The engine keeps the total size (as JSON text) of its steps' inputs,
-- outputs and errors, so that it can hold an instance to
-- --max-instance-bytes, and the advancer can bound each batch by bytes as
-- well as by rows without loading a row first. Rows of instances that
-- existed before this version start at 0 and are set by their next decision.
ALTER TABLE instances ADD COLUMN stored_bytes bigint NOT NULL DEFAULT 0;
