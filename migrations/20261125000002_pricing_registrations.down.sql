DROP TABLE pricing_registrations;
DROP FUNCTION pricing_registrations_immutable();
