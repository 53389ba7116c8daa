"""The real-time HTTP service: `create_app(run_dir, settings)` and `serve` behind the CLI."""

from recommender.serving.app import create_app, serve
from recommender.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]
