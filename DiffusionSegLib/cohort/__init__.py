"""Learning from the unlabeled scans of a cohort: labels propagated from the labeled scans by registration."""
