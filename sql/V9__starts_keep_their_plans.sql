-- stead schema, version 9: the start functions keep their plans.
--
-- stead's pooled sessions plan every statement for its parameters
-- (plan_cache_mode = force_custom_plan), so that no plan made while a table
-- was small is kept as it grows. The statements inside these functions are
-- key lookups and single-row inserts whose plans do not depend on table
-- size, and planning them on every call made a start cost about twice as
-- much: they use cached plans again.
ALTER FUNCTION start_instance(text, integer, jsonb, text) SET plan_cache_mode = auto;
ALTER FUNCTION start_instances(text, integer, jsonb[], text[]) SET plan_cache_mode = auto;
ALTER FUNCTION send_signal(text, text, jsonb) SET plan_cache_mode = auto;
