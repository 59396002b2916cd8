"""The 10 Trailers12k genres, in the order used everywhere."""

GENRES = (
  "action",
  "adventure",
  "comedy",
  "crime",
  "drama",
  "fantasy",
  "horror",
  "romance",
  "sci-fi",
  "thriller",
)
# Short names (first three letters) used as CSV columns in results tables.
SHORT_NAMES = tuple(g[:3] for g in GENRES)
NUM_GENRES = len(GENRES)
# Fold subsets as stored in mtgc.csv split{0,1,2} and `split_assignment`.
SUBSETS = ("train", "validation", "test")
NUM_FOLDS = 3
