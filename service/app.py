"""The FastAPI app factory: thin wiring of routers, error handlers and middleware."""

from __future__ import annotations

from fastapi import FastAPI

from service.api.routes import audit as audit_routes
from service.api.routes import base_models, datasets, health, jobs, models, predict, pretrain
from service.api.routes import evaluations as evaluation_routes
from service.api.routes import exports as export_routes
from service.api.routes import keys as key_routes
from service.api.routes import quotas as quota_routes
from service.api.routes import webhooks as webhook_routes
from service.dashboard import install as install_dashboard
from service.errors import install_error_handlers
from service.inference import check_inference_settings
from service.inference.inference import install as install_inference
from service.lookups import install as install_lookups
from service.metrics import RequestMetrics
from service.quotas.predictions import install as install_prediction_quota
from service.rate_limit import install as install_rate_limit
from service.settings import Settings, get_settings
from service.upload_limit import UploadLimitMiddleware
from service.webhooks import check_webhook_settings

API_DESCRIPTION = """
Few-shot image classification on Big Transfer (BiT). Upload a few labeled images,
fine-tune a BiT classifier, predict with it. Authenticate with `Authorization: Bearer <key>`.
Errors are `{"error": {"code": "...", "message": "..."}}` with a stable code.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; `settings` overrides the environment (tests)."""
    settings = settings or get_settings()
    check_webhook_settings(settings)  # refuse to start with webhooks on and a weak secret
    backend = check_inference_settings(settings)  # or with an inference backend that cannot run
    app = FastAPI(title="BiT service", version="0.1.0", description=API_DESCRIPTION)
    app.state.settings = settings  # what `deps.SettingsDep` injects
    app.state.inference_backend = backend  # shown by /readyz
    install_error_handlers(app)
    install_lookups(app)  # the callers of keys and the models of ids, briefly remembered
    install_rate_limit(app)  # a token bucket per API key, checked once the key is known
    install_prediction_quota(app)  # a token bucket per tenant, spent by predict's images
    app.add_middleware(RequestMetrics)
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.add_middleware(UploadLimitMiddleware, max_bytes=app.state.settings.max_upload_bytes)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(export_routes.router)
    app.include_router(evaluation_routes.router)
    app.include_router(predict.router)
    app.include_router(base_models.router)
    app.include_router(pretrain.router)
    app.include_router(key_routes.router)
    app.include_router(audit_routes.router)
    app.include_router(quota_routes.router)
    app.include_router(webhook_routes.router)
    install_dashboard(app)  # /admin: router, static files, security headers
    install_inference(app)  # closes the model cache and forward thread at shutdown
    return app
