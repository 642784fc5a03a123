"""A small adjective and noun list for RULER-style needle keys (``adjective-noun``, e.g. ``ablaze-enrollment``).

RULER draws its keys from the ``wonderwords`` package's lists; these are our own short lists of
common English words with the same role, so the text needle task needs no download or extra package.
"""

ADJECTIVES = (
    "ablaze", "abrupt", "agile", "amber", "ancient", "arctic", "autumn", "bashful", "bitter", "blazing",
    "bold", "brave", "breezy", "brisk", "bronze", "calm", "careful", "cheerful", "chilly", "clever",
    "cloudy", "coastal", "cosmic", "crimson", "crisp", "curious", "dapper", "dazzling", "distant", "dusty",
    "eager", "early", "elegant", "empty", "fancy", "fearless", "fierce", "fluffy", "foggy", "fragile",
    "frozen", "gentle", "giant", "gloomy", "golden", "graceful", "grumpy", "hidden", "hollow", "humble",
    "icy", "jolly", "lively", "lofty", "lonely", "lucky", "marble", "mellow", "misty", "modest",
    "narrow", "nimble", "noisy", "orange", "patient", "polite", "proud", "purple", "quiet", "rapid",
    "rustic", "scarlet", "shiny", "silent", "silver", "sleepy", "smooth", "sturdy", "sunny", "swift",
    "tender", "tidy", "tiny", "velvet", "vivid", "wandering", "wary", "windy", "wise", "witty",
)

NOUNS = (
    "anchor", "apple", "arrow", "badge", "balloon", "banner", "basket", "beacon", "blanket", "bridge",
    "bucket", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cellar", "chapel", "circus",
    "compass", "cottage", "crayon", "credit", "dragon", "drawer", "engine", "enrollment", "falcon", "feather",
    "festival", "fountain", "garden", "glacier", "guitar", "hammer", "harbor", "helmet", "island", "jacket",
    "kettle", "ladder", "lantern", "lemon", "library", "magnet", "meadow", "mirror", "monument", "needle",
    "notebook", "orchard", "paddle", "palace", "parcel", "pebble", "pencil", "pepper", "planet", "pocket",
    "puzzle", "quarry", "rabbit", "ribbon", "rocket", "saddle", "sandal", "shelter", "signal", "spinach",
    "station", "statue", "summit", "teapot", "theater", "ticket", "tower", "trumpet", "tunnel", "umbrella",
    "valley", "velvet", "violin", "wagon", "walnut", "whistle", "window", "harvest", "lighthouse", "quilt",
)
