"""Serving personalized policies: an OpenAI-compatible HTTP API where every request is answered with its own user's
soft prompt, a batching decode engine, and live onboarding of new users (docs/serving.md).

    from serving.service import load_service      # a finished run folder -> a Service
    from serving.app import create_app            # Service -> FastAPI app (`pipelines.serve` runs it under uvicorn)
"""
