"""What both services and the worker share: settings, database, messaging, errors, wire code."""
