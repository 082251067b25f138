"""User models: map a user (integer index, 0 = generic; optional text) to a soft prompt of LLM-width vectors.

Nothing here knows about training. `UserModel` is the one interface every model in the project plugs in, and
`prepend_prefix` the one function that puts its output in front of token embeddings.
"""

from user_models.implicit import (
    ClusterUserModel,
    ImplicitUserModel,
    IndividualUserModel,
    UniformUserModel,
    build_implicit_user_model,
)
from user_models.prefix import PrefixedInputs, prepend_prefix
from user_models.user_model import ExplicitTextUserModel, UserModel, UserPrefix, build_user_model, load_user_model

__all__ = [
    "ClusterUserModel", "ImplicitUserModel", "IndividualUserModel", "UniformUserModel", "build_implicit_user_model",
    "ExplicitTextUserModel", "UserModel", "UserPrefix", "build_user_model", "load_user_model",
    "PrefixedInputs", "prepend_prefix",
]
