DROP TABLE approval_uses;
DROP FUNCTION approval_uses_final();
