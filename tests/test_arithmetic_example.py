"""The worked example's data (train/examples/arithmetic.py): the checker, the careless writer's
answers worked out by hand (column arithmetic on the units digit), and the rows it writes."""

from train.examples import arithmetic


def test_reward_reads_the_last_number():
  prompt = "Mia has 17 coins. Mia gets 8 more. How many coins now?"
  assert arithmetic.reward(prompt, " 17 + 8 = 25") == 1.0
  assert arithmetic.reward(prompt, " 17 + 8 = 15") == 0.0
  assert arithmetic.reward(prompt, " no number") == 0.0
  assert arithmetic.parse("Ben had 23 apples and lost 7. How many apples are left?") == (23, "-", 7)


def test_careless_forgets_exactly_the_carry_and_the_borrow():
  cases = {(17, "+", 8): 15, (12, "+", 3): 15, (19, "+", 9): 18, (20, "+", 9): 29,
           (23, "-", 7): 26, (18, "-", 3): 15, (10, "-", 1): 19, (9, "-", 9): 0}
  for (a, op, b), want in cases.items():
    assert arithmetic.careless(a, op, b) == want, (a, op, b)


def test_rows_follow_the_writer_and_the_pairs_oppose_its_mistake():
  sft = arithmetic.rows("sft", 4000, seed=0, held_out=False)
  needs = [r for r in sft if arithmetic.careless(*arithmetic.parse(r["prompt"]))
           != arithmetic.solve(*arithmetic.parse(r["prompt"]))]
  wrong = [r for r in sft if not arithmetic.reward(r["prompt"], r["completion"])]
  assert all(r in needs for r in wrong)  # only carry/borrow problems are ever wrong
  assert abs(len(wrong) / len(needs) - arithmetic.CARELESS) < 0.05
  for r in arithmetic.rows("pairs", 500, seed=1, held_out=False):
    a, op, b = arithmetic.parse(r["prompt"])
    assert arithmetic.reward(r["prompt"], r["chosen"]) == 1.0
    assert arithmetic.reward(r["prompt"], r["rejected"]) == 0.0
    if arithmetic.careless(a, op, b) != arithmetic.solve(a, op, b):
      assert r["rejected"] == arithmetic.answer_text(a, op, b, arithmetic.careless(a, op, b))


def test_held_out_sentences_are_never_trained_on():
  train = {r["prompt"] for r in arithmetic.rows("prompts", 2000, seed=2, held_out=False)}
  val = {r["prompt"] for r in arithmetic.rows("prompts", 500, seed=3, held_out=True)}
  shape = lambda p: "".join(ch for ch in p if not ch.isdigit())
  assert not {shape(p) for p in train} & {shape(p) for p in val}
  assert arithmetic.rows("sft", 5, seed=4, held_out=False) == \
      arithmetic.rows("sft", 5, seed=4, held_out=False)
