"""The ``order`` of each of engineflow's own handlers on the train engine: the one place these numbers live.

Handlers on one event run by ascending ``order``, then in the order they were declared; a recipe's
handlers default to :data:`USER` (0). Below 0 runs what a recipe's handlers read (the epoch's losses,
validation, history, best); above it runs what writes the run down (records, checkpoint, log line), so
that it writes what every handler of the epoch left. The README's table "Handlers: order and control
flow" lists these constants, with their events, and a test compares the two.
"""

from __future__ import annotations

# STARTED, ITERATION_STARTED, EPOCH_COMPLETED, COMPLETED, EXCEPTION_RAISED
HOOKS = -5000  # forward hooks (ef.hooks) go on as the fit (activation statistics: an iteration they record)
# starts, and come off first when the epoch (activation statistics), the fit or a failure ends it: no
# validation, or handler of the end, runs through them

# EPOCH_STARTED
FIT_EPOCH_STARTED = -2000  # the fit notes where the epoch starts (its position), before any handler can end it
CLEAR_METRICS = -1000  # the last epoch's state.metrics are cleared, before any handler fills them again
LOSS_EPOCH_STARTED = -900  # the epoch's loss sums start from zero, before the first step is counted
SCHEDULE_STARTED = -500  # an Ignite parameter scheduler sets its value as Ignite attaches it (also on
# ITERATION_STARTED), before the step and the recipe's handlers use it

# ITERATION_COMPLETED
LOSS_CHECK = -1000  # each loss is checked (NaN/inf stops the run) and summed, before any handler uses it
GRAD_NORM = -600  # the gradients' norm is taken after the step, before a handler of the recipe can clear them
EMA_UPDATE = -500  # ef.ema's average takes the step's weights once the loss passed its check (a NaN step is
# never averaged in), before the recipe's handlers read it and the checkpoint saves it
SCHEDULE_ITERATION = -400  # each iteration's learning rate is shown, then iteration schedules step: after the loss
# check (a NaN loss stops the run before the schedule moves), before the recipe's handlers, which see the next lr

# EPOCH_COMPLETED
FIT_EPOCH_COMPLETED = -3000  # the epoch counts as complete (the fit's position), first: a checkpoint taken by a
# later handler of this event resumes after the epoch, not inside it
TRAIN_LOSS = -300  # train/loss (and train/<x>_loss) for the epoch join state.metrics, before validation reads them
LEARNING_RATES = -250  # train/lr (each optimizer's groups) joins state.metrics, before the epoch's schedules step
VALIDATION = -200  # valid/<name> for each eval loader, so that the epoch's metrics are complete before history
HISTORY = -100  # history gets the epoch and best is updated, from the complete metrics, before the recipe's handlers
SCHEDULE_EPOCH = -75  # epoch schedules step once the epoch's metrics are complete (ReduceLROnPlateau reads the main
# metric), before the recipe's handlers, which see the next epoch's lr
EARLY_STOPPING = -50  # ef.early_stopping compares the epoch's metric, once history and best have it; its stop
# lets the recipe's handlers, the records and the checkpoint of the epoch still run

USER = 0  # the default of ef.on / every_n_epochs / every_n_iterations: a recipe's handlers see all of the above

ACTIVATION_STATS = 800  # activation statistics are read back every N iterations and put on the board, after the
# recipe's handlers and before the records write the board
RECORDS = 900  # metrics.jsonl, the index, TensorBoard (on ITERATION_COMPLETED: its loss curve), after the recipe's
# handlers, so that the epoch is written once every handler of it ran
CHECKPOINT = 950  # the checkpoint the policy asks for (or an interrupt's), after the records: a resume from it
# never skips recording an epoch the checkpoint counts as done
REPORT = 1000  # the progress bar and the epoch's log line, last: the line shows the epoch as it was recorded
