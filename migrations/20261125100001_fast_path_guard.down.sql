DROP FUNCTION spendguard_require_fresh(boolean);
