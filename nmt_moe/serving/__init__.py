"""`nmt-moe serve`: an HTTP translation server (app.py) around one model worker with dynamic batching
(batcher.py). FastAPI and uvicorn are imported only by app.py, so nothing else pays for them."""
