"""What the bot does about each kind of event; `router` combines every module's handlers."""

from handlers import comment, pull_request, review
from handlers.router import Router

router = Router(pull_request.router, comment.router, review.router)
