-- stead schema, version 12: an advancer names the slots it works as a bitmap.
--
-- `slot = ANY($2)` with the member's slots as an array compares each row the
-- due scan reads with every element in turn (a generic plan cannot hash a
-- parameter's array): with 128 slots per member, that was a twentieth of the
-- database's time in a drain. A bitmap answers in one step. The function is
-- plain SQL over built-ins, so it is inlined where it is used.

-- Whether bit `slot` of `owned` is set (bit n is bit n % 8 of byte n / 8,
-- as get_bit numbers them); a slot past the bitmap's end is not owned.
CREATE FUNCTION owned_slot(owned bytea, slot integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN slot >= 0 AND slot < length(owned) * 8 THEN get_bit(owned, slot) = 1
            ELSE false END;
