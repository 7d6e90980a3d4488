"""Patients across providers: issuer-qualified records, links into persons, merges, the
whole imaging history and priors (docs/patients.md)."""
