-- stead schema, version 7: a signal waits for the engine's transaction.
--
-- A signal used to wake its instance only if the instance was not due
-- already. Sent while an advance transaction held the instance (after that
-- transaction had read the pending signals), it committed at once and woke
-- nothing; if that transaction left the step waiting (the step started in
-- it, as it does when the steps before it ran inline), the signal was never
-- seen. Now delivering a signal first locks the instance row, so it waits
-- for such a transaction to commit and wakes the instance that came of it.
CREATE OR REPLACE FUNCTION send_signal(p_id text, p_name text, p_payload jsonb) RETURNS bigint
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $$
DECLARE
    v_status text;
    v_signal bigint;
BEGIN
    IF p_name IS NULL OR NOT valid_id(p_name) THEN
        RAISE EXCEPTION 'stead: signal name must be 1-200 characters of [A-Za-z0-9._:@-]'
            USING ERRCODE = '22023';
    END IF;
    SELECT status INTO v_status FROM instances WHERE id = p_id FOR NO KEY UPDATE;
    IF v_status IS NULL THEN
        RAISE EXCEPTION 'stead: instance "%" does not exist', p_id USING ERRCODE = 'ST404';
    END IF;
    IF v_status IN ('completed', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'stead: instance "%" has ended (%)', p_id, v_status USING ERRCODE = 'ST409';
    END IF;
    INSERT INTO signals (instance_id, name, payload)
    VALUES (p_id, p_name, coalesce(p_payload, 'null'::jsonb))
    RETURNING id INTO v_signal;
    UPDATE instances SET wake_at = now()
    WHERE id = p_id AND (wake_at IS NULL OR wake_at > now());
    RETURN v_signal;
END
$$;
