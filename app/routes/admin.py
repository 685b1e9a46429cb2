"""The admin API: the served models, listed, added or replaced (PUT) and removed (DELETE) while the server serves
(app.models.ModelRegistry). It loads checkpoints from paths on the server's own disk, so it needs the API key, and is
off (403) on a server without one."""

from pathlib import Path as FilePath
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from app.errors import (
    AdminDisabled,
    CheckpointRefused,
    InvalidInput,
    ModelConflict,
    NotReady,
    Unauthorized,
    UnknownModel,
    error_responses,
)
from app.routes.deps import ReadyService, ServiceDep, require_api_key
from app.schemas import ModelInfo
from app.service import Service
from app.settings import MODEL_NAME


async def require_admin_key(service: ServiceDep) -> None:
    """Raises AdminDisabled (403) on a server without an API key: anyone who reaches it could load any path."""
    if service.settings.api_key is None:
        raise AdminDisabled("the admin API needs an API key: set SPAMGPT_API_KEY")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key), Depends(require_api_key)])


async def changeable_service(service: ReadyService) -> Service:
    """The service, unless it is shutting down; raises NotReady (503) then: a model loaded while draining would
    never serve, and its load would hold the shutdown back."""
    if service.status == "draining":
        raise NotReady("the server is shutting down: no model changes while it drains")
    return service


ChangeableService = Annotated[Service, Depends(changeable_service)]
ModelName = Annotated[str, Path(pattern=f"^{MODEL_NAME.pattern}$", description="1 to 64 letters, digits, . _ -")]
ADMIN_ERRORS = (AdminDisabled, Unauthorized, NotReady)


class ModelList(BaseModel):
    default: str = Field(description="The model requests get when they name none")
    models: list[ModelInfo]
    refused: dict[str, str] = Field(description="Checkpoints refused at startup, by name: why each was not served")


class CheckpointSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(
        min_length=1,
        description="A checkpoint directory on the server's disk; a relative path is from the server's working "
        "directory",
        examples=["/models/phishing-v2"],
    )


class Replaced(BaseModel):
    revision: int
    checkpoint: str


class ModelChange(BaseModel):
    model: ModelInfo = Field(description="The version serving now")
    replaced: Replaced | None = Field(description="The version it replaced, its memory given back; null: added")


class Removal(BaseModel):
    removed: str
    revision: int = Field(description="The revision that served until now, its memory given back")


@router.get("/models", responses=error_responses(*ADMIN_ERRORS))
async def list_models(service: ReadyService) -> ModelList:
    """Every model served, with its card and revision, the default's name, and the checkpoints refused at startup."""
    registry = service.models
    models = [service.model_info(model) for model in registry.models.values()]
    return ModelList(default=registry.default, models=models, refused=registry.refused)


@router.put(
    "/models/{name}",
    responses={201: {"model": ModelChange, "description": "Added"}}
    | error_responses(*ADMIN_ERRORS, CheckpointRefused, InvalidInput),
)
async def put_model(
    name: ModelName, body: CheckpointSource, service: ChangeableService, response: Response
) -> ModelChange:
    """Serve the checkpoint at `checkpoint` as `name`: 201 when added, 200 when it replaces the version serving now.
    The new version is loaded and warmed up while the old one serves, then takes over at once: requests already
    holding the old version finish on it, later ones get the new. Answers once the old version's last request is
    answered and its memory given back. A checkpoint that fails its checks or its warm-up is refused (422) and
    changes nothing. Changes to one name are made one at a time, in the order they arrive."""
    model, previous = await service.models.put(name, FilePath(body.checkpoint))
    response.status_code = 200 if previous else 201
    replaced = None if previous is None else Replaced(revision=previous.revision, checkpoint=str(previous.path))
    return ModelChange(model=service.model_info(model), replaced=replaced)


@router.delete("/models/{name}", responses=error_responses(*ADMIN_ERRORS, UnknownModel, ModelConflict))
async def remove_model(name: str, service: ChangeableService) -> Removal:
    """Stop serving `name`: requests that already hold it finish on it, later ones get 404. Answers once its last
    request is answered and its memory given back. The default model cannot be removed (409)."""
    model = await service.models.remove(name)
    return Removal(removed=name, revision=model.revision)
