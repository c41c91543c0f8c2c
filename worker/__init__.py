"""GPU workers: the Celery task, model preloading, job records, MP4 encoding, S3 upload, metrics."""
