"""Jobs: creation, lifecycle transitions, leases and progress, shared by API and worker."""
