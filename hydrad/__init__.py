"""hydrad: a full-duplex voice-agent daemon on the Hydra realtime speech-to-speech API."""

__version__ = "0.1.0"
