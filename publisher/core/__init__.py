"""What every publisher stage shares: the state database, typed outcomes and progress, the run locks."""
