"""Publishing: the upload plan, the model card, what the paperwork may say."""
