"""What every part of kd-ops stands on: errors a user can fix (`errors`), the name -> component
registries (`registry`), the offline and no-telemetry environment defaults (`env`), the version."""
