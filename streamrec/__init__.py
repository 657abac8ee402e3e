"""streamrec: Twilio call recordings from webhook to stored, transcribed result."""

__version__ = "0.1.0"
