"""The model kit: the weights replay needs beyond a trace. store: where kits live and what they hold;
builder: made from a loaded model (torch); reader: opened for replay (numpy)."""
