"""The contract between producers and workers: settings, job records, queues, the Celery app.

Torch-free: producers import it on machines without torch.
"""
