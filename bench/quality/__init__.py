"""How good the model is: MM-Rec, its ablations and Transformers trained alike, one row per
(arch, seed), then one report over the rows.

    python -m bench.quality run --arch mmrec --seed 0 --out runs/quality --compile
    python -m bench.quality run --arch transformer --seed 0 --out runs/quality --compile
    python -m bench.quality run --arch mmrec --seed 0 --out runs/equal_time --compile --time-budget 600
    python -m bench.quality report runs/quality --out bench/results/quality_small_h100
    python -m bench.quality run --smoke --arch mmrec --seed 0 --out /tmp/quality   # tiny, CPU, seconds

Rows are independent: run them in any order, in separate calls or side by side in
parallel processes (processes that share a GPU share its throughput, so their tokens/s
are not the model's alone), then report the folder. A row longer than one sitting:
--checkpoint-every N writes its training checkpoint every N steps and --stop-at K stops at
step K; the same command then continues from the checkpoint, to the same row.

Archs, all with the preset's width, depth and heads:
  mmrec                the preset's MM-Rec
  mmrec-no-window      window = 0: without the working memory
  mmrec-no-longterm    top_k = 0: without the long-term memory
  mmrec-no-recurrence  mode = "none": without the short-term recurrence
  transformer          bench.transformer's GPT, full causal attention
  transformer-window   the same GPT attending to the last `window` tokens (the preset's)

A row: torch.manual_seed(seed), the model, then --steps optimizer steps of
mmrec_model.training's Trainer (AdamW, weight decay on matrices, clipping, linear warmup then
cosine; fused AdamW and bf16 autocast on CUDA; --compile compiles each block) on the
batches train_batch(corpus, step, seed) of the embedded corpus (the standard library's
source): every arch of one seed sees the same batches and schedule. With --final-steps N --final-seq-len L, the last N steps
read windows of L bytes instead, batch_size * seq_len / L of them (the same bytes a step),
as long-context pretraining ends on long windows: what a memory beyond the working memory
can learn to keep, it learns where the windows are long. With --time-budget S instead of
--steps, a timed warm-up of each phase (budget.py) sets the steps that S seconds of steady
training hold, and the schedule with them (rows at equal GPU time). Then, eagerly:
  - validation bits per byte on the fixed windows validation_offsets(corpus, val_windows, seq_len);
  - long-context bits per byte by position: the first L + 1 bytes (L = --long-len) of each
    validation document that has them (at most --long-docs, in corpus order), batch 1;
    the loss at each position, averaged over the documents and over the bands
    [0, L/16), [L/16, L/4), [L/4, L) (0-2K, 2K-8K, 8K-32K at L = 32K). MM-Rec reads the
    window in chunks of --chunk-size with its state carried, the Transformers in one call
    (the full one, trained at seq_len, is expected to degrade beyond it);
  - recall: in each long document, --probe-passages passages of --probe-len bytes P, at
    offsets o evenly spaced from P on (so that the farthest copy fits in --long-len), are each
    copied to start D bytes after them (the document's first o + D bytes, then the copy),
    for each D of --probe-distances (default: those of 512 to 64K whose copy --long-len holds,
    2 P + D <= L + 1: 16K at L = 32K, 64K from L = 66047); bits per byte on the copies against
    those on the passages' first occurrences. What a model recalls from beyond its window
    shows as copies cheaper than a model without that memory reads them at D > window;
  - passkey: a random 5-digit key stated once (`# pass key: 48213`, a line) at a depth in
    filler of validation text, and at the end `# pass key: `, at contexts of 512, 1K, 4K, 16K,
    64K and 256K bytes up to --passkey-max-len, --passkey-trials trials each (depths spread
    evenly; the same trials for every row); each model reads the prompt as it reads long
    context and decodes 5 bytes greedily from what that left (MM-Rec's state, the
    Transformer's KV cache; the windowed Transformer reads all again for each byte): the
    share of trials with all 5 digits right, and of the digits right.
It is written (atomically) to DIR/<label>-seed<S>.json, the label being the arch, for an
MM-Rec arch its --config overrides, +window=W with --window for an arch that has one, and
+finalLxN with a final phase, +budgetSs with a time budget (mmrec+top_k=8,
mmrec+window=256, mmrec+final16384x500, transformer+budget600s): settings, model
configuration, parameters, training bytes, time and tokens/s, the time budget's record
(None without one), the training curve (mean bits per byte of
every --log-every steps), the measurements ("long_context", "recall", "passkey"), device,
versions and date.

The report reads every DIR/*-seed*.json and gives, per label, the mean over seeds with
the range [min, max]; each ablation against the full model of the same seed, --config
overrides, final phase and time budget (so that one folder can hold a study of configurations), in
validation, past the first position band (2K-32K), in the farthest
band and on the farthest copy, and its passkey accuracy beside the full model's at the
longest context; bits per byte by position, the copies by distance, the passkey by context.
It writes STEM.md, STEM.json (rows and summary) and STEM.png (training curves, bits per byte
by position, the copies and the passkey accuracy, means over seeds).

The package, by concern: settings.py (the archs, the settings and their checks, the rows'
labels), run.py (a row: training and its checkpoint), budget.py (the steps a time budget
holds), measure.py (long context, recall),
passkey.py (the passkey test), report.py (the report), __main__.py (the command line).
"""
