"""Ray edit jobs: jobs (plan, connect, run_ray_job, compute_masks), driver (RayEditJob, the event loop and the
actor class), stream (EditStream, one sequential memory), shards (how a job splits its edit file and merges the
stream stores) and mask_worker (masks and routing decisions in parallel). Ray is imported only where a job runs."""
